"""Bad input at the door, through the command line as a user meets it: every malformed spec, profile, path or
environment value is one `error:` line naming the file, the field and the value, exit code 2, and nothing is
written (no runs root, no run dir, no manifest). tests/specs/bad/ holds the specs (each with `# expect:` and
`# expect-not:` lines); files that cannot carry comments are generated here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import invoke, rejected

from asbatch.rundir import SweepDir
from asbatch.spec import PROFILES_ENV, SpecError, load_sweep

SPECS = Path(__file__).resolve().parent / "specs"
BAD = sorted((SPECS / "bad").glob("*.yaml"))
COMMANDS = {"run": ["run"], "submit": ["submit", "--dry-run"]}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (PROFILES_ENV, "ASBATCH_RUNS", "ASBATCH_SIGNAL_DELAY_S", "ASBATCH_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def _lines(path: Path, tag: str) -> list[str]:
    return [line.split(tag, 1)[1].strip() for line in path.read_text().splitlines() if line.startswith(tag)]


# ---------------------------------------------------------------------------------------------- the corpus

def test_the_bad_corpus_covers_many_failure_kinds():
    assert len(BAD) >= 150
    assert all(_lines(p, "# expect:") and p.read_text().startswith("# expect:") for p in BAD)
    kinds = {p.stem.split("_")[0] for p in BAD}
    assert {"yaml", "ctrl", "num", "flag", "cross", "profile"} <= kinds


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_a_bad_spec_is_one_line_naming_the_file_and_field_exit_2_nothing_written(path, command, tmp_path):
    runs = tmp_path / "runs"
    line = rejected(invoke(*COMMANDS[command], path, "--runs-root", runs), *_lines(path, "# expect:"))
    assert line.startswith(f"error: {path}: ")
    assert not any(text in line for text in _lines(path, "# expect-not:"))
    assert not runs.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_init_from_a_run_of_a_stage_this_one_does_not_run_after(command, tmp_path):
    """(Not in the corpus: the spec must name stage a's run id, which every new config field changes.)"""
    from asbatch.spec import parse_spec

    base = {"sweep": "s", "defaults": {"adversarial": {"lam": 0.0}, "model": {"bayesian": False}}}
    run_a = load_sweep_data({**base, "stages": {"a": {}}}).runs[0].run_id
    spec = tmp_path / "spec.yaml"
    stage_b = {"config": {"model": {"init_from": f"run:{run_a}"}}}
    spec.write_text(yaml.safe_dump({**base, "stages": {"a": {}, "b": stage_b}}))
    assert parse_spec(yaml.safe_load(spec.read_text())).stages["b"].after == []
    line = rejected(invoke(*COMMANDS[command], spec, "--runs-root", tmp_path / "runs"),
                    f"stages.b.config.model.init_from: run {run_a}", "which this run's stage does not run after")
    assert line.startswith(f"error: {spec}: ") and not (tmp_path / "runs").exists()


def load_sweep_data(data: dict):
    from asbatch.spec import expand, parse_spec

    return expand(parse_spec(data))


def test_rejecting_a_bad_spec_does_not_import_torch():
    code = ("import sys\nfrom asbatch.cli import main\n"
            "try:\n    main([sys.argv[1], sys.argv[2], '--runs-root', sys.argv[3]])\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    for path in (SPECS / "bad" / "num_lr_inf.yaml", SPECS / "bad" / "cross_init_from_bayesian_upstream.yaml"):
        for command in ("run", "submit"):
            out = subprocess.run([sys.executable, "-c", code, command, str(path), "/nonexistent/runs"],
                                 capture_output=True, text=True, timeout=120)
            assert out.stdout.strip() == "exit 2 False", out.stdout + out.stderr
            assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")


# ---------------------------------------------------------------------------------------------- files

def _write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


GENERATED = {
    "binary.yaml": (bytes(range(256)) * 4, ["a binary file (NUL byte at offset 0), not YAML text"]),
    "latin1.yaml": ("sweep: café\n".encode("latin-1"), ["not UTF-8 text (byte 0xe9 at offset 10)"]),
    "utf16.yaml": ("sweep: a\n".encode("utf-16"), ["a binary file (NUL byte"]),
    "huge.yaml": (b"sweep: a\n" + b"# padding padding padding\n" * 400_000,
                  ["the file has 10400009 bytes, more than the limit of 262144"]),
    "wide_list.yaml": ("sweep: a\ngrid:\n  seed: [" + ",".join(["0"] * 60_000) + "]\n",
                       ["more than 20000 YAML nodes"]),
    "deep_10000.yaml": ("sweep: a\ngrid: {seed: " + "[" * 10_000 + "]" * 10_000 + "}\n", ["nest"]),
    "cycle_1000.yaml": (yaml.safe_dump({"sweep": "a", "stages": {f"s{i}": {"after": f"s{(i + 1) % 1000}"}
                                                                 for i in range(1000)}}),
                        ["stages.s0.after: dependency cycle s0 -> s1 -> s2 -> s3 -> ... -> s998 -> s999 -> s0 "
                         "(1000 stages)"]),
    "control_in_plain_text.yaml": (b"sweep: a\x07b\n", ["YAML syntax error at line 1"]),
    "bom_then_tab.yaml": ("\ufeffsweep: a\n\tgrid: {}\n".encode(), ["a tab character"]),
}


@pytest.mark.parametrize("name", GENERATED)
def test_hostile_files_are_one_line_naming_the_file(name, tmp_path):
    data, expected = GENERATED[name]
    path = _write(tmp_path, name, data)
    for command in COMMANDS.values():
        line = rejected(invoke(*command, path, "--runs-root", tmp_path / "runs"), *expected)
        assert line.startswith(f"error: {path}: ") and len(line) < 400
    assert not (tmp_path / "runs").exists()


def test_a_deep_but_valid_chain_of_stages_needs_no_recursion(tmp_path):
    stages = {f"s{i}": {"after": f"s{i - 1}"} if i else {} for i in range(1500)}
    sweep = load_sweep(_write(tmp_path, "chain.yaml", yaml.safe_dump({"sweep": "a", "stages": stages})))
    assert [s.name for s in sweep.stages] == [f"s{i}" for i in range(1500)]


def test_special_files_directories_and_missing_paths(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    rejected(invoke("run", fifo, "--runs-root", tmp_path / "runs"), "is not a regular file")
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    rejected(invoke("submit", zero, "--dry-run"), f"{zero}: is not a regular file")
    rejected(invoke("run", tmp_path), "is a directory")
    rejected(invoke("run", tmp_path / "nope.yaml"), "does not exist")
    odd = _write(tmp_path, "a\nb.yaml", "sweep: [")
    rejected(invoke("run", odd, "--runs-root", tmp_path / "runs"), "YAML syntax error")
    assert not (tmp_path / "runs").exists()


def test_a_profile_is_never_echoed(tmp_path):
    secret = _write(tmp_path, "id_rsa", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n")
    spec = _write(tmp_path, "spec.yaml", f"sweep: a\nprofile: {secret}\n")
    line = rejected(invoke("submit", spec, "--dry-run"), "not a profile", "this file holds a str")
    assert "BEGIN" not in line and "b3Bl" not in line
    _write(tmp_path, "id_rsa", b"\x00\x01secret")
    assert "secret" not in rejected(invoke("submit", spec, "--dry-run"), "binary file")
    environ = _write(tmp_path, "environ.yaml", "sweep: a\nprofile: /proc/self/environ\n")
    rejected(invoke("submit", environ, "--dry-run", env={"SECRET_TOKEN": "hunter2"}), "binary file")
    shadow = _write(tmp_path, "shadow", "root:$6$salt$hunter2:19000:0:99999:7:::\n")
    _write(tmp_path, "spec.yaml", f"sweep: a\nprofile: {shadow}\n")
    assert "hunter2" not in rejected(invoke("submit", spec, "--dry-run"), "none of its 1 keys is a profile field")


def test_env_values_are_exported_as_written(tmp_path):
    profile = _write(tmp_path, "p.yaml", "env:\n  A: true\n  B: 0x10\n  C: 1.50\n  D: ''\n  E: no\n")
    sweep = load_sweep(_write(tmp_path, "spec.yaml", f"sweep: a\nprofile: {profile}\n"))
    assert sweep.env == {"A": "true", "B": "0x10", "C": "1.50", "D": "", "E": "no"}


# ---------------------------------------------------------------------------------------------- strings

@pytest.mark.parametrize(("runs_root", "expected"), [
    ("runs\n#SBATCH --qos=high", "--runs-root: control characters"),
    ("runs\r", "--runs-root: control characters"),
    ("runs/100%A", "--runs-root: '%' is not allowed"),
    ("runs\udcff", "--runs-root: the path is not valid UTF-8"),  # the byte 0xff as a shell passes it
])
def test_a_runs_root_that_would_inject_sbatch_lines_is_refused(runs_root, expected, tmp_path):
    spec = SPECS / "good" / "single_stage.yaml"
    root = tmp_path / runs_root
    for command in (["run"], ["submit", "--dry-run"], ["submit", "--executor", "local"]):
        rejected(invoke(*command, spec, "--runs-root", root), expected)
    rejected(invoke("submit", spec, "--executor", "local", env={"ASBATCH_RUNS": str(root)}),
             expected.replace("--runs-root", "$ASBATCH_RUNS"))
    assert list(tmp_path.iterdir()) == []


def test_the_submit_library_refuses_them_too(tmp_path):
    from asbatch.launch import submit

    sweep = load_sweep(SPECS / "good" / "single_stage.yaml")
    with pytest.raises(SpecError, match="runs root: control characters"):
        submit(sweep, tmp_path / "a\nb", executor="local")
    with pytest.raises(SpecError, match=r"runs root: .*not UTF-8"):
        submit(sweep, tmp_path / "a\udcff", executor="local")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ("wait", "s", "--poll", "nan"), ("wait", "s", "--timeout", "nan"), ("wait", "s", "--timeout", "inf"),
    ("sync", "s", "--timeout", "nan"), ("sync", "s", "--timeout", "inf"), ("sync", "s", "--timeout", "-inf"),
])
def test_a_float_option_that_is_not_a_finite_number_is_refused_while_parsing(args, tmp_path):
    # before any sweep is looked up (no sweep `s` exists) and before `sync` starts a `wandb sync` child
    rejected(invoke(*args, "--runs-root", tmp_path), f"Invalid value for '{args[2]}'", "is not a finite number")
    assert list(tmp_path.iterdir()) == []


def test_other_bad_arguments_and_environment(tmp_path):
    spec = SPECS / "good" / "single_stage.yaml"
    rejected(invoke("submit", spec, "--dry-run", env={"ASBATCH_SIGNAL_DELAY_S": "soon"}),
             "$ASBATCH_SIGNAL_DELAY_S: expected whole seconds", "'soon'")
    rejected(invoke("run", spec, "--stage", "nope\n"), "--stage 'nope\\n' is not a stage")
    named = _write(tmp_path, "named.yaml", "sweep: a\nprofile: local\n")
    rejected(invoke("submit", named, "--dry-run", env={PROFILES_ENV: "~nosuchuser-asbatch/profiles"}),
             "$ASBATCH_PROFILES: '~nosuchuser-asbatch/profiles': '~nosuchuser-asbatch' names no user")
    for command in (["run"], ["submit", "--executor", "local"]):
        rejected(invoke(*command, spec, "--runs-root", tmp_path / "runs", env={"WANDB_MODE": "bogus"}),
                 "WANDB_MODE='bogus': not a W&B mode (wandb accepts: online, offline, disabled, dryrun")
    profile = _write(tmp_path, "p.yaml", "env: {WANDB_MODE: onlin}\n")
    rejected(invoke("submit", _write(tmp_path, "w.yaml", f"sweep: a\nprofile: {profile}\n"), "--dry-run"),
             "w.yaml: profile env WANDB_MODE='onlin': not a W&B mode")
    assert not (tmp_path / "runs").exists()
    rejected(invoke("run", spec, "model.init_from=~nosuchuser-asbatch/m.pt"), "defaults.model.init_from: ",
             "names no user", "(set on the command line: model.init_from=~nosuchuser-asbatch/m.pt)")
    rejected(invoke("submit", spec, "--executor", "cloud"), "Invalid value for '--executor'")
    (tmp_path / "file").write_text("")
    rejected(invoke("run", spec, "--runs-root", tmp_path / "file"), "--runs-root", "is a file")
    rejected(invoke("run", spec, "--runs-root", tmp_path / "file" / "runs"), "cannot create the runs root", code=1)
    rejected(invoke("logs", "train-0123456789", "--task", "-1"), "--task", "-1 is not in the range")
    rejected(invoke("run", spec, "--runs-root", ""), "Invalid value for '--runs-root': an empty path")
    rejected(invoke("status", "z" * 300), "File name too long")


def test_init_from_a_run_of_an_earlier_submission_must_have_finished_and_fit(tmp_path):
    spec = _write(tmp_path, "ft.yaml", "sweep: s\ndefaults:\n  model: {init_from: 'run:pretrain-0123456789'}\n")
    runs = tmp_path / "runs"
    rejected(invoke("submit", spec, "--dry-run", "--runs-root", runs),
             "defaults.model.init_from: run pretrain-0123456789 has no trained model in")
    run_dir = SweepDir.at(runs, "s").run("pretrain-0123456789")
    run_dir.write_config({"model": {"name": "resnet20", "bayesian": True}, "data": {"name": "digits"}})
    run_dir.model_file.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    rejected(invoke("submit", spec, "--dry-run", "--runs-root", runs),
             "defaults.model.init_from: 'run:pretrain-0123456789' trains a Bayesian net")
    run_dir.write_config({"model": {"name": "resnet20", "bayesian": False}, "data": {"name": "digits"}})
    assert invoke("submit", spec, "--dry-run", "--runs-root", runs).exit_code == 0


def test_a_bare_weights_file_must_fit_the_model(tmp_path):
    import torch

    from asbatch.models import build_model

    weights = tmp_path / "w.pt"
    torch.save(build_model("mlp", 10, in_channels=1, bayesian=False, width=8).state_dict(), weights)
    spec = _write(tmp_path, "ft.yaml", f"sweep: s\ndefaults:\n  model: {{name: mlp, width: 8, init_from: {weights}}}\n")
    assert invoke("submit", spec, "--dry-run", "--runs-root", tmp_path / "runs").exit_code == 0
    torch.save(build_model("mlp", 10, in_channels=1, bayesian=False, width=16).state_dict(), weights)
    rejected(invoke("submit", spec, "--dry-run", "--runs-root", tmp_path / "runs"),
             f"model.init_from {str(weights)!r}", "does not fit mlp (width 8, 10 classes, 1 input channels)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["run dir", "its model.pt"])
def test_the_weights_in_a_run_dir_must_fit_the_model_too(name, tmp_path):
    import torch

    run_dir = SweepDir.at(tmp_path / "pre", "p").run("pretrain-0123456789")
    run_dir.write_config({"model": {"name": "mlp", "width": 8, "bayesian": False}, "data": {"name": "digits"}})
    torch.save({"x": torch.zeros(2)}, run_dir.model_file)  # its config fits, its weights do not
    target = run_dir.path if name == "run dir" else run_dir.model_file
    spec = _write(tmp_path, "ft.yaml", f"sweep: s\ndefaults:\n  model: {{name: mlp, width: 8, init_from: {target}}}\n")
    for command in (["run"], ["submit", "--executor", "local"]):
        rejected(invoke(*command, spec, "--runs-root", tmp_path / "runs"),
                 f"model.init_from {str(run_dir.model_file)!r}", "does not fit mlp", "Missing key(s)")
    assert not (tmp_path / "runs").exists()


def test_run_or_submit_of_a_later_stage_alone_needs_its_upstream_finished(tmp_path):
    spec = _write(tmp_path, "two.yaml", yaml.safe_dump({
        "sweep": "two", "defaults": {"cpu": True, "data": {"name": "digits"}, "model": {"name": "mlp"}},
        "stages": {"pre": {"config": {"model": {"bayesian": False}, "adversarial": {"lam": 0.0}}},
                   "ft": {"after": "pre", "init_from": "pre"}}}))
    rejected(invoke("run", spec, "--stage", "ft", "--runs-root", tmp_path / "runs"),
             "--stage ft: run ft-", "needs run pre-", "run stage 'pre' too")
    for executor in ("local", "slurm", "debug"):
        rejected(invoke("submit", spec, "--stage", "ft", "--executor", executor, "--runs-root", tmp_path / "runs"),
                 "stage ft: run ft-", "needs run pre-", "which has not finished and is not queued")
    assert not (tmp_path / "runs").exists()

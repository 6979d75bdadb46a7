"""The command line's error convention beyond specs: damaged state files name the file (exit 2) in status,
logs, cancel and retry while `status` alone still lists the healthy sweeps; runtime failures (missing data,
no network, no W&B key, an uncreatable runs root, a non-finite loss) are one `error:` line, exit 1, red on a
terminal, with the traceback only under ASBATCH_DEBUG=1."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from cifar_fixtures import write_fake_cifar10
from cli_helpers import invoke, rejected
from click.testing import CliRunner
from fakeslurm import FakeSlurm

from asbatch.cli.app import App
from asbatch.rundir import RunDir, SweepDir

CONFIG = {"cpu": True, "data": {"name": "digits", "batch_size": 64}, "model": {"name": "mlp", "width": 8},
          "schedule": {"name": "cosine", "epochs": 1}}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("ASBATCH_PROFILES", "ASBATCH_RUNS", "ASBATCH_DATA", "ASBATCH_DEBUG", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def _spec(tmp_path: Path, sweep: str, **extra) -> Path:
    path = tmp_path / f"{sweep}.yaml"
    path.write_text(yaml.safe_dump({"sweep": sweep, "profile": "local", "defaults": CONFIG,
                                    "grid": {"seed": [0, 1]}, **extra}))
    return path


@pytest.fixture
def sweeps(tmp_path, monkeypatch):
    """Two sweeps submitted to fake Slurm: `good` and `bad` (whose manifest the tests damage)."""
    FakeSlurm(tmp_path / "fake").activate(monkeypatch)
    runs = tmp_path / "runs"
    for name in ("good", "bad"):
        result = invoke("submit", _spec(tmp_path, name), "--executor", "slurm", "--runs-root", runs)
        assert result.exit_code == 0, result.output
    return runs


def _damage(manifest: Path, how: str) -> None:
    data = json.loads(manifest.read_text())
    if how == "truncated":
        manifest.write_text(manifest.read_text()[:100])
        return
    if how == "a list":
        data = [data]
    elif how == "job id not from Slurm":
        data["submissions"][0]["job_id"] = "abc"
    elif how == "debug id under slurm":
        data["submissions"][1]["job_id"] = data["submissions"][1]["array_job_id"] = "DEBUG_1"
    elif how == "config without epochs":
        del data["submissions"][0]["config"]["schedule"]
    elif how == "unknown executor":
        data["arrays"][0]["executor"] = "kubernetes"
    manifest.write_text(json.dumps(data))


DAMAGE = ["truncated", "a list", "job id not from Slurm", "debug id under slurm", "config without epochs",
          "unknown executor"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_manifest_is_one_line_naming_it_in_every_command(how, sweeps):
    manifest = SweepDir(sweeps / "bad").manifest_file
    run_id = json.loads(manifest.read_text())["submissions"][0]["run_id"]
    _damage(manifest, how)
    for command in (["status", "bad"], ["logs", run_id], ["logs", run_id, "--sweep", "bad"], ["cancel", "bad"],
                    ["retry", "bad"]):
        rejected(invoke(*command, "--runs-root", sweeps), str(manifest))
    listing = invoke("status", "--runs-root", sweeps)
    assert listing.exit_code == 0 and "Traceback" not in listing.output
    assert "good" in listing.output and "2 PENDING" in listing.output
    warnings = [line for line in listing.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(manifest) in warnings[0]


def test_damaged_run_files_name_the_file(sweeps):
    run_dir = Path(json.loads(SweepDir(sweeps / "good").manifest_file.read_text())["submissions"][0]["run_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"epoch": 0, "global_step": 5}\n{"epoch": 1, "trunc')
    rejected(invoke("status", "good", "--runs-root", sweeps), f"{run_dir / 'metrics.jsonl'}: line 2 is not JSON")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (run_dir / "results.json").write_text("{")
    rejected(invoke("table", "good", "--runs-root", sweeps), f"{run_dir / 'results.json'}: cannot be read as JSON")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real finished run (tiny: a few seconds) of sweep `s`; tests copy it and damage the copy."""
    from tests_support import tiny_digits_config

    from asbatch.train import train

    config = tiny_digits_config("s", schedule={"name": "cosine", "epochs": 2})
    run_dir = tmp_path_factory.mktemp("runs") / "s" / config.run_id
    train(config, run_dir)
    return run_dir


@pytest.fixture
def copied_runs(finished_run, tmp_path):
    """Runs root with sweep `s` (the finished run, to damage) and a healthy sweep `ok` beside it."""
    runs = tmp_path / "runs"
    shutil.copytree(finished_run.parent, runs / "s")
    shutil.copytree(finished_run.parent, runs / "ok")
    return runs, RunDir(runs / "s" / finished_run.name)


def _edit_json(path: Path, change) -> str:
    data = json.loads(path.read_text())
    change(data)
    return json.dumps(data)


def _stringify(data):
    data["evaluation"] = {k: str(v) for k, v in data["evaluation"].items()}


LAST_ROW = '{"epoch": 1, "global_step": 10, "train_loss": 1.0}'
DAMAGED_RUN_FILES = {  # file -> (content, or a change of the real content) -> what the message says
    "results.json": [
        ("[1]", "expected a JSON object, got a list"),
        ("null", "expected a JSON object, got null"),
        (lambda d: d.update(evaluation=None), "evaluation: expected an object, got null"),
        (lambda d: d.update(timing="x"), "timing: expected an object, got a string"),
        (_stringify, "expected a number, got a string"),
    ],
    "metrics.jsonl": [
        ("[1]", "line 2: expected a JSON object, got a list"),
        ("null", "line 2: expected a JSON object, got null"),
        ('{"epoch": 1}', "line 2: global_step: missing"),
        ('{"epoch": "x", "global_step": 10}', "line 2: epoch: expected a whole number"),
        ('{"epoch": 1, "global_step": 10, "train_loss": "x"}', "line 2: train_loss: expected a number"),
    ],
}
CASES = [(name, content, message) for name, cases in DAMAGED_RUN_FILES.items() for content, message in cases]


def _damage_run_file(run_dir: RunDir, name: str, content) -> Path:
    path = run_dir.path / name
    if callable(content):
        path.write_text(_edit_json(path, content))
    elif name == "metrics.jsonl":
        path.write_text(path.read_text().splitlines()[0] + "\n" + content + "\n")
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(("name", "content", "message"), CASES, ids=[f"{n}:{m}" for n, _, m in CASES])
def test_run_files_of_the_wrong_shape_are_one_line_naming_the_file(name, content, message, copied_runs):
    runs, run_dir = copied_runs
    path = _damage_run_file(run_dir, name, content)
    commands = [["status", "s"], ["table", "s"], ["table", "s", "--per-run"]]
    if name == "metrics.jsonl":
        commands.append(["report", "s", "--no-wandb"])
    for command in commands:
        rejected(invoke(*command, "--runs-root", runs), f"{path}: damaged", message)
    _healthy_listed_damaged_warned(runs, path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["config"].update(seed="x"), "config or evaluation: invalid literal"),
    (lambda d: d["config"].update(adversarial=None), "config or evaluation"),
    (lambda d: d["evaluation"].pop("nll"), "no 'nll' where a record needs it"),
    (lambda d: d.clear(), "no 'config' where a record needs it"),
], ids=["seed text", "no adversarial section", "no nll", "empty"])
def test_results_without_what_a_record_needs_are_damaged_for_table(change, message, copied_runs):
    runs, run_dir = copied_runs
    path = _damage_run_file(run_dir, "results.json", change)
    for command in (["table", "s"], ["table", "s", "--per-run"], ["report", "s", "--no-wandb"]):
        rejected(invoke(*command, "--runs-root", runs), f"{path}: damaged results", message)


def _healthy_listed_damaged_warned(runs: Path, path: Path) -> None:
    listing = invoke("status", "--runs-root", runs)
    assert listing.exit_code == 0 and "Traceback" not in listing.output, listing.output
    assert "ok" in listing.output and "1 COMPLETED" in listing.output
    warnings = [line for line in listing.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(path) in warnings[0], listing.output


@pytest.mark.parametrize(("content", "message"), [
    ('{"a": [1,2', "not YAML"),
    ("[1, 2, 3]", "expected a mapping, got a list"),
    ("sweep: s\nstage: train\n", "data: missing (cut short?)"),
    ("sweep: s\ndata: 3\n", "data: expected a mapping, got a number"),
])
def test_a_damaged_config_is_one_line_naming_it(content, message, copied_runs):
    runs, run_dir = copied_runs
    run_dir.config_file.write_text(content)
    rejected(invoke("status", "s", "--runs-root", runs), f"{run_dir.config_file}: damaged config", message)
    _healthy_listed_damaged_warned(runs, run_dir.config_file)


def test_results_json_as_a_directory_is_damaged_everywhere(copied_runs):
    runs, run_dir = copied_runs
    run_dir.results_file.unlink()
    run_dir.results_file.mkdir()
    for command in (["status", "s"], ["table", "s"]):
        rejected(invoke(*command, "--runs-root", runs), f"{run_dir.results_file}: damaged results (a directory")
    _healthy_listed_damaged_warned(runs, run_dir.results_file)


def test_non_finite_metrics_are_missing_points_not_a_crash(copied_runs):
    from asbatch.analysis.aggregate import stat

    s = stat([1.0, float("nan"), 3.0, float("inf")])  # statistics.stdev raised AttributeError on NaN
    assert (s.mean, s.n) == (2.0, 2) and s.std == pytest.approx(2 ** 0.5)
    runs, run_dir = copied_runs
    rows = run_dir.metrics_file.read_text().splitlines()
    rows[-1] = json.dumps({**json.loads(rows[-1]), "train_loss": float("nan"), "test_acc_mean": float("inf"),
                           "step_time_s": float("nan")})
    run_dir.metrics_file.write_text("\n".join(rows) + "\n")
    for command in (["status", "s"], ["table", "s", "--per-run"], ["report", "s", "--no-wandb"]):
        result = invoke(*command, "--runs-root", runs)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("content", ['{"sweep": "s", "submi', "[1]", '{"sweep": ["s"]}'])
def test_table_and_report_name_a_damaged_manifest(content, copied_runs):
    runs, _ = copied_runs
    manifest = SweepDir(runs / "s").manifest_file
    manifest.write_text(content)
    for command in (["table", "s"], ["report", "s", "--no-wandb"]):
        rejected(invoke(*command, "--runs-root", runs), f"{manifest}: ")


def _as_user(*args: str | Path) -> subprocess.CompletedProcess:
    """`asbatch ARGS` in a fresh process that file permissions apply to (root without its override)."""
    command = [sys.executable, "-m", "asbatch", *map(str, args)]
    if os.geteuid() == 0:
        if not shutil.which("capsh"):
            reason = "root, and no capsh to drop the capability that ignores file permissions (apt: libcap2-bin)"
            if os.environ.get("CI", "").lower() == "true":  # CI installs it (.ci/run): never a skip there
                pytest.fail(f"CI=true but {reason}", pytrace=False)
            pytest.skip(reason)
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(command)]
    return subprocess.run(command, capture_output=True, text=True, errors="surrogateescape", timeout=120)


@pytest.mark.parametrize("what", ["run dir", "sweep dir"])
def test_an_unreadable_dir_is_one_line_naming_it_and_the_list_warns(what, copied_runs):
    runs, run_dir = copied_runs
    closed = run_dir.path if what == "run dir" else run_dir.path.parent
    closed.chmod(0)
    try:
        for command in (["status", "s"], ["table", "s"], ["report", "s", "--no-wandb"]):
            result = _as_user(*command, "--runs-root", runs)
            assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
            assert result.stderr.startswith("error: ") and "cannot read (permission denied)" in result.stderr
            assert str(closed) in result.stderr
        listing = _as_user("status", "--runs-root", runs)
    finally:
        closed.chmod(0o755)
    assert listing.returncode == 0 and "ok" in listing.stdout and "1 COMPLETED" in listing.stdout, listing
    assert listing.stderr.startswith("warning: ") and str(closed) in listing.stderr, listing.stderr


def test_table_and_report_without_finished_runs_fail_in_one_line_and_write_nothing(copied_runs):
    runs, run_dir = copied_runs
    run_dir.results_file.unlink()
    for command in (["table", "s"], ["table", "s", "--per-run"], ["report", "s", "--no-wandb"]):
        rejected(invoke(*command, "--runs-root", runs), "sweep s has no finished runs yet", "1 unfinished", code=1)
    assert not SweepDir(runs / "s").report_dir.exists()


def test_report_of_a_sweep_dir_whose_name_is_not_utf8(copied_runs):
    runs, _ = copied_runs
    odd = Path(os.fsdecode(bytes(runs) + b"/s\xff"))
    (runs / "s").rename(odd)
    SweepDir(odd).manifest_file.write_text('{"sweep": "s", "submissions": []}')  # its runs' sweep
    result = _as_user("report", odd, "--no-wandb")
    assert result.returncode == 0, result.stderr
    assert (SweepDir(odd).report_dir / "report.md").read_text().startswith("# Sweep s\ufffd\n")


def test_table_on_a_directory_that_is_no_sweep_is_bad_input(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    rejected(invoke("table", tmp_path / "notes"), "is not a sweep: it has no manifest and no run dirs")
    rejected(invoke("table", "nope", "--runs-root", tmp_path), "no sweep 'nope' under")
    rejected(invoke("report", tmp_path / "notes"), "is not a sweep")


def test_a_sweep_name_that_is_not_there_lists_the_sweeps_and_the_closest_one(tmp_path):
    run_dir = tmp_path / "quickstart" / "train-0123456789"  # a sweep made by `asbatch run`: run dirs only
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    for command in ("status", "table", "wait"):
        rejected(invoke(command, "quickstrat", "--runs-root", tmp_path),
                 f"no sweep 'quickstrat' under {tmp_path} (sweeps there: quickstart; did you mean 'quickstart'?)")
    rejected(invoke("status", "jobs/quickstart.yaml", "--runs-root", tmp_path),
             "SWEEP is a sweep's name (the spec's `sweep:`), not a spec file")
    for command in ("cancel", "retry"):
        rejected(invoke(command, "quickstart", "--runs-root", tmp_path),
                 "sweep 'quickstart' under", "was trained by `asbatch run`, not submitted")
    rejected(invoke("logs", "train-0123", "--runs-root", tmp_path),  # the start of an id names it
             "run train-0123456789 was trained in-process by `asbatch run`", code=1)
    (tmp_path / "quickstart" / "train-0123999999").mkdir()
    (tmp_path / "quickstart" / "train-0123999999" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    rejected(invoke("logs", "train-0123", "--runs-root", tmp_path), "'train-0123' starts 2 run ids")


def test_status_of_a_runs_root_without_sweeps_says_why_and_what_to_do(tmp_path):
    for root, why in ((tmp_path / "nothing", "does not exist"), (tmp_path, "holds no sweeps")):
        result = invoke("status", "--runs-root", root)
        assert result.exit_code == 0 and result.output.startswith(f"{root} {why} "), result.output
        assert "start one with `asbatch run SPEC` or `asbatch submit SPEC`" in result.output


def test_wandb_that_cannot_be_asked_is_one_line_in_asbatch_words(tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path / "wandb"), "NETRC": ""}
    line = rejected(invoke("table", "quickstart", "--source", "wandb", "--runs-root", tmp_path, env=env),
                    "error: W&B: reading the runs of asbatch failed: ", code=1)
    assert "UsageError" not in line and "Exception:" not in line, line


def test_missing_data_is_one_line_before_anything_is_created(tmp_path):
    config = tmp_path / "c10.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": {"name": "cifar10", "root": str(tmp_path / "data")}}))
    runs = tmp_path / "runs"
    missing = f"cifar10: missing {tmp_path / 'data' / 'cifar-10-batches-py' / 'data_batch_1'}"
    rejected(invoke("run", config, "--runs-root", runs), missing, "asbatch data download cifar10 --root", code=1)
    rejected(invoke("submit", config, "--executor", "local", "--runs-root", runs), missing, code=1)
    assert not runs.exists()
    dry = invoke("submit", config, "--dry-run", "--runs-root", runs)
    assert dry.exit_code == 0 and f"warning: {missing}" in dry.output and not runs.exists()
    write_fake_cifar10(tmp_path / "data")
    dry = invoke("submit", config, "--dry-run", "--runs-root", runs)
    assert dry.exit_code == 0 and "warning" not in dry.output


def test_the_data_root_of_a_profile_env_is_where_data_is_looked_for(tmp_path):
    write_fake_cifar10(tmp_path / "shared")
    profile = tmp_path / "cluster.yaml"
    profile.write_text(f"partition: debug\nenv: {{ASBATCH_DATA: {tmp_path / 'shared'}}}\n")
    spec = _spec(tmp_path, "c", profile=str(profile), defaults={**CONFIG, "data": {"name": "cifar10"}})
    dry = invoke("submit", spec, "--dry-run", "--runs-root", tmp_path / "runs")
    assert dry.exit_code == 0 and "warning" not in dry.output


def test_sync_without_a_key_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run_dir = SweepDir.at(tmp_path / "runs", "s").run("train-0123456789")
    (run_dir.wandb_dir / "offline-run-20250101_000000-train-0123456789").mkdir(parents=True)
    run_dir.write_config(CONFIG)
    run_dir.write_wandb_state({"id": "train-0123456789", "project": "asbatch"})
    rejected(invoke("sync", "s", "--runs-root", tmp_path / "runs"), "no W&B API key", code=1)


@pytest.mark.slow
def test_download_without_network_is_one_line(tmp_path):
    proxy = "http://127.0.0.1:9"  # nothing listens there: the download fails at once, with or without internet
    env = {"https_proxy": proxy, "http_proxy": proxy, "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy}
    rejected(invoke("data", "download", "cifar10", "--root", tmp_path / "data", env=env),
             "cannot download cifar10 into", code=1)


@pytest.mark.slow
def test_a_non_finite_loss_is_one_line(tmp_path):
    config = tmp_path / "inf.yaml"  # a prior sigma of 1e-30 makes the KL term overflow at the first step
    config.write_text(yaml.safe_dump({**CONFIG, "data": {"name": "synthetic", "batch_size": 500},
                                      "model": {"name": "mlp", "width": 8, "prior_sigma": 1e-30},
                                      "adversarial": {"lam": 0.0, "kl_weight": 1.0}}))
    result = invoke("run", config, "--runs-root", tmp_path / "runs")
    errors = result.stderr.strip().splitlines()  # stdout has the run's progress lines
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert errors[0].startswith("error: loss is nan or inf at global step 1 (epoch 1)"), errors


@click.group(cls=App)
def _group() -> None:
    """A throwaway group with the real error handling."""


@_group.command()
def boom() -> None:
    {}["missing"]  # a plain bug, as a user would meet one


def test_an_unexpected_failure_is_one_red_line_and_its_traceback_is_on_request():
    result = CliRunner().invoke(_group, ["boom"])
    assert result.exit_code == 1 and result.output == "error: KeyError: 'missing'\n"
    coloured = CliRunner().invoke(_group, ["boom"], color=True)
    assert coloured.output.startswith("\x1b[31m\x1b[1merror:\x1b[0m KeyError")
    debug = CliRunner().invoke(_group, ["boom"], env={"ASBATCH_DEBUG": "1"})
    assert "Traceback (most recent call last)" in debug.output and debug.output.endswith("KeyError: 'missing'\n")
    rejected(CliRunner().invoke(_group, ["boom", "--bogus"]), "No such option '--bogus'")

"""A real site's profile (issue 21, items 1 and 6): `setup` lines and a `python` command, checked at the door,
shown by `submit --dry-run`, run by every Slurm job (on the local cluster: the lines and the interpreter show
in the job's log) and by nothing else; and the `extra` sbatch flags GPU sites use, each a checked token."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import invoke, rejected
from test_launch import TINY, job_history, wait_for_results

from asbatch.launch import Manifest, submit
from asbatch.launch.slurm import executor_parameters, sbatch_flags
from asbatch.spec import SpecError, load_profile, load_sweep
from asbatch.spec.resources import shipped_profiles_dir


def write_profile(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "time": 5, **fields},
                                   sort_keys=False))
    return path


def write_spec(path: Path, profile: Path, stages: dict | None = None) -> Path:
    spec = {"sweep": "site", "profile": str(profile), "defaults": TINY,
            "stages": stages or {"train": {"config": {"adversarial": {"lam": 0.8}}}}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


SITE = {"setup": ["module purge", "source /etc/profile.d/site.sh", "export ASBATCH_SETUP_PROBE=yes",
                  "export WANDB_API_KEY='not shown'", "conda activate bnn  # a comment"],
        "python": "apptainer exec --nv /images/bnn.sif python3",
        "env": {"OMP_NUM_THREADS": "1"}}


# ---------------------------------------------------------------------------------------------- good profiles

def test_setup_and_python_reach_every_stage_as_submitit_parameters(tmp_path):
    profile = write_profile(tmp_path / "site.yaml", **SITE)
    loaded = load_profile(str(profile))
    assert (loaded.setup, loaded.python) == (SITE["setup"], SITE["python"])
    stages = {"pretrain": {}, "fine_tune": {"after": "pretrain", "resources": {"time": 7}}}
    sweep = load_sweep(write_spec(tmp_path / "spec.yaml", profile, stages))
    for stage in sweep.stages:
        params = executor_parameters(sweep.name, stage, sweep.env)
        assert params["slurm_setup"] == ["export OMP_NUM_THREADS=1", *SITE["setup"]]  # env first: setup may use it
        assert params["slurm_python"] == SITE["python"]  # submitit's executor runs it (`executor_of`)
        flags = sbatch_flags(params, 2, tmp_path / "logs")
        assert flags[-7:] == ["export OMP_NUM_THREADS=1", "module purge", "source /etc/profile.d/site.sh",
                              "export ASBATCH_SETUP_PROBE=yes", "export WANDB_API_KEY=***",
                              "conda activate bnn  # a comment", f"python: {SITE['python']}"]
    assert executor_parameters(sweep.name, sweep.stages[0], sweep.env, kind="local").keys() == {"name", "timeout_min"}


def test_a_stage_may_use_another_interpreter_and_a_profile_without_them_writes_none(tmp_path):
    profile = write_profile(tmp_path / "site.yaml", **SITE)
    stages = {"gpu": {}, "cpu": {"resources": {"python": "/opt/conda/envs/cpu/bin/python", "setup": []}}}
    sweep = load_sweep(write_spec(tmp_path / "spec.yaml", profile, stages))
    cpu = executor_parameters(sweep.name, sweep.stage("cpu"), {})
    assert "slurm_setup" not in cpu and cpu["slurm_python"] == "/opt/conda/envs/cpu/bin/python"
    plain = load_sweep(write_spec(tmp_path / "plain.yaml", write_profile(tmp_path / "plain-profile.yaml")))
    params = executor_parameters(plain.name, plain.stages[0], {})
    assert "slurm_setup" not in params and "slurm_python" not in params
    assert not any(f.startswith("python:") for f in sbatch_flags(params, 1, tmp_path))


def test_dry_run_shows_the_lines_for_slurm_and_says_the_local_executor_does_not_use_them(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", write_profile(tmp_path / "site.yaml", **SITE))
    result = invoke("submit", spec, "--dry-run", "--executor", "slurm", "--runs-root", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert lines[-7:] == ["export OMP_NUM_THREADS=1", *SITE["setup"][:3], "export WANDB_API_KEY=***",
                          SITE["setup"][4], f"python: {SITE['python']}"]
    assert "not shown" not in result.output
    local = invoke("submit", spec, "--dry-run", "--executor", "local", "--runs-root", tmp_path / "runs")
    assert local.exit_code == 0, local.output
    assert "setup lines and python command are not used here: they run in Slurm jobs only" in local.output
    assert "module purge" not in local.output and not (tmp_path / "runs").exists()


EXTRA_GOOD = {"exclude": "n1,gpu[01-04,07]", "nodelist": "n2", "gpu-bind": "verbose,closest", "hint": "nomultithread",
              "gres-flags": "enforce-binding", "wckey": "bnn-paper", "switches": "1@30:00", "begin": "now+2hours",
              "deadline": "2030-01-31T18:00", "tmp": "100G", "mem-per-cpu": "4G"}


def test_the_extra_flags_gpu_sites_use_reach_the_script(tmp_path):
    profile = write_profile(tmp_path / "site.yaml", extra=EXTRA_GOOD, mem_gb=None)
    sweep = load_sweep(write_spec(tmp_path / "spec.yaml", profile))
    flags = sbatch_flags(executor_parameters(sweep.name, sweep.stages[0], {}), 1, tmp_path)
    assert {f"--{k}={v}" for k, v in EXTRA_GOOD.items()} <= set(flags)
    gpu = write_profile(tmp_path / "gpu.yaml", gpus_per_node=2, mem_gb=None, extra={"mem-per-gpu": "16G"})
    gpu_sweep = load_sweep(write_spec(tmp_path / "gpu-spec.yaml", gpu, {"train": {"config": {"cpu": False}}}))
    assert "--mem-per-gpu=16G" in sbatch_flags(executor_parameters("s", gpu_sweep.stages[0], {}), 1, tmp_path)


def test_the_commented_examples_of_the_shipped_gpu_profile_are_valid(tmp_path):
    """Uncommented (below the header, the first of its two `python:` examples), the template still loads."""
    text = (shipped_profiles_dir() / "example-gpu-cluster.yaml").read_text()
    header, _, body = text.partition("\npartition:")
    lines = [line[2:] if line.startswith("# ") and not line.startswith("# python: apptainer") else line
             for line in body.splitlines()]
    profile = tmp_path / "gpu.yaml"
    profile.write_text("partition:" + "\n".join(lines) + "\n")
    loaded = load_profile(str(profile))
    assert loaded.setup[:2] == ["module purge", "module load cuda/12.1 nccl/2.18"] and loaded.python == "python"
    assert loaded.resources.extra["hint"] == "nomultithread" and loaded.resources.account == "my-project"
    assert header.startswith("# Template") and "apptainer exec --nv" in text


# ---------------------------------------------------------------------------------------------- bad profiles

BAD_PROFILES = {  # profile fields -> what the one error line says (after the profile's name)
    "setup_carriage_return": ({"setup": ["module load cuda\r#SBATCH --uid=0"]}, "setup[0]: control characters"),
    "setup_newline": ({"setup": ["echo a", "echo b\necho c"]}, "setup[1]: control characters"),
    "setup_nul": ({"setup": ["echo \x00"]}, "setup[0]: control characters"),
    "setup_empty_line": ({"setup": ["echo a", "  "]}, "setup[1]: an empty line; leave it out"),
    "setup_not_a_list": ({"setup": "module load cuda"}, "setup: Input should be a valid list"),
    "setup_too_long": ({"setup": ["echo " + "x" * 5000]}, "setup[0]: at most 4096 characters"),
    "setup_too_many": ({"setup": ["true"] * 101}, "setup: List should have at most 100 items"),
    "setup_open_quote": ({"setup": ["export A='b"]}, "setup[0]: a quote (') is not closed: the job script would read"),
    "setup_continuation": ({"setup": ["module load \\"]}, "setup[0]: a trailing backslash joins"),
    "setup_heredoc": ({"setup": ["cat <<EOF"]}, "setup[0]: a here-document (<<)"),
    "python_empty": ({"python": ""}, "python: an empty line; leave it out"),
    "python_blank": ({"python": "   "}, "python: an empty line"),
    "python_a_number": ({"python": 3}, "python: Input should be a valid string"),
    "python_newline": ({"python": "python3\nrm -rf ~"}, "python: control characters"),
    "python_two_commands": ({"python": "module load x; python3"}, "python: one command: no ; & | < >"),
    "python_comment": ({"python": "python3 # mine"}, "python: a '#' outside quotes starts a comment"),
    "python_assignment": ({"python": "PYTHONPATH=/x python3"}, "write `env NAME=value python3`"),
    "hint_unknown": ({"extra": {"hint": "fast"}}, "extra.hint: expected one of compute_bound, memory_bound"),
    "hint_two": ({"extra": {"hint": "compute_bound,multithread"}}, "extra.hint: expected one of"),
    "gres_flags_unknown": ({"extra": {"gres-flags": "bind"}}, "extra.gres-flags: expected a comma-separated list"),
    "mem_per_gpu_unit": ({"extra": {"mem-per-gpu": "16GiB"}}, "extra.mem-per-gpu: expected a size from 64M"),
    "mem_per_gpu_zero": ({"extra": {"mem-per-gpu": "0"}}, "extra.mem-per-gpu: expected a size from 64M"),
    "mem_per_gpu_and_mem": ({"gpus_per_node": 1, "extra": {"mem-per-gpu": "16G"}},
                            "extra.mem-per-gpu and mem_gb 1: Slurm takes only one of --mem"),
    "cpus_per_gpu": ({"extra": {"cpus-per-gpu": 4}}, "use the resources field 'cpus_per_task'"),
    "exclude_empty_host": ({"extra": {"exclude": "n1,,n2"}}, "extra.exclude: expected a host list"),
    "nodelist_file": ({"extra": {"nodelist": "/etc/hosts"}}, "extra.nodelist: expected a host list"),
    "gpu_bind_unknown": ({"extra": {"gpu-bind": "all"}}, "extra.gpu-bind: expected closest, none"),
    "begin_unknown": ({"extra": {"begin": "soon"}}, "extra.begin: expected now+N"),
    "wckey_spaces": ({"extra": {"wckey": "a b"}}, "extra.wckey: only letters, digits"),
    "switches_word": ({"extra": {"switches": "many"}}, "extra.switches: expected COUNT[@MAX-WAIT]"),
    "hint_bare": ({"extra": {"hint": True}}, "extra.hint: --hint needs a value"),
    "output_owned": ({"extra": {"output": "x.log"}}, "asbatch writes each array task's log"),
    "signal_owned": ({"extra": {"signal": "USR1@60"}}, "asbatch asks for USR2 before the time limit"),
    "ntasks_owned": ({"extra": {"ntasks": 2}}, "use the resources field 'gpus_per_node'"),
    "gpu_gres_still_refused": ({"extra": {"gres": "gpu:2"}}, "ask with gpus_per_node"),
}


@pytest.mark.parametrize("name", BAD_PROFILES)
def test_a_bad_setup_python_or_extra_flag_is_one_line_naming_file_and_field_exit_2(name, tmp_path):
    fields, expected = BAD_PROFILES[name]
    profile = tmp_path / "site.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "mem_gb": 1, **fields}))
    spec = write_spec(tmp_path / "spec.yaml", profile)
    for command in (["submit", "--dry-run"], ["run"]):
        line = rejected(invoke(*command, spec, "--runs-root", tmp_path / "runs"), expected)
        assert line.startswith(f"error: {spec}: profile '{profile}': "), line
        assert "rm -rf" not in line and "uid=0" not in line  # a profile's values are never echoed
    assert not (tmp_path / "runs").exists()


def test_the_same_rules_hold_for_a_stage_and_name_its_field(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", write_profile(tmp_path / "site.yaml"),
                      {"train": {"resources": {"python": "python3 | tee x", "extra": {"hint": "nomultithread"}}}})
    line = rejected(invoke("submit", spec, "--dry-run"), "stages.train.resources.python: one command",
                    "(got 'python3 | tee x')")
    assert line.startswith(f"error: {spec}: ")
    with pytest.raises(SpecError, match=r"stages.train.resources: extra.mem-per-cpu and mem_gb 1: Slurm takes only"):
        load_sweep(write_spec(tmp_path / "spec.yaml", write_profile(tmp_path / "site.yaml"),
                              {"train": {"resources": {"extra": {"mem-per-cpu": "2G"}}}}))
    ok = load_sweep(write_spec(tmp_path / "spec.yaml", write_profile(tmp_path / "site.yaml"),
                               {"train": {"resources": {"mem_gb": None, "extra": {"mem-per-cpu": "2G"}}}}))
    assert ok.stages[0].resources.extra == {"mem-per-cpu": "2G"} and ok.stages[0].resources.mem_gb is None


def test_asbatch_run_does_not_run_the_setup_lines_or_the_python_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    profile = write_profile(tmp_path / "site.yaml", setup=["exit 3"], python="/nonexistent/python3")
    spec = write_spec(tmp_path / "spec.yaml", profile, {"train": {"config": {"schedule": {"epochs": 1}}}})
    result = invoke("run", spec, "--runs-root", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "runs" / "site").glob("train-*/results.json"))) == 1


# ---------------------------------------------------------------------------------------------- the local cluster

@pytest.mark.slurm
def test_a_slurm_job_runs_the_setup_lines_then_the_python_command(local_slurm, tmp_path, monkeypatch):
    """The lines run in the job script before Python (their output in the job log, their exports in Python's
    environment), the python command starts Python with submitit's arguments, and the run completes."""
    monkeypatch.chdir(tmp_path)
    probe = tmp_path / "probe-python"  # stands in for `apptainer exec img.sif python3`: says it ran, then execs
    probe.write_text(f'#!/bin/sh\necho "python-probe $ASBATCH_PYTHON_PROBE $ASBATCH_SETUP_PROBE: $*"\n'
                     f'exec {shlex.quote(sys.executable)} "$@"\n')
    probe.chmod(0o755)
    python = f"env ASBATCH_PYTHON_PROBE=1 {shlex.quote(str(probe))}"
    profile = write_profile(tmp_path / "site.yaml", setup=["export ASBATCH_SETUP_PROBE=yes", "echo setup-ran",
                                                           "export MY_TOKEN='s3cret value'"],
                            python=python, env={"OMP_NUM_THREADS": "1"})
    spec = write_spec(tmp_path / "spec.yaml", profile)

    dry = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", dry_run=True)
    real = submit(load_sweep(spec), tmp_path / "runs", executor="slurm")
    run_dir = tmp_path / "runs" / "site" / real.submitted[0].run_ids[0]
    wait_for_results([run_dir], timeout=180)

    job = Manifest.load(tmp_path / "runs" / "site").submissions[0].job_id
    log_dir = tmp_path / "runs" / "site" / ".slurm" / job
    log = (log_dir / f"{job}_0_log.out").read_text()
    assert log.startswith("setup-ran\n"), log  # the batch script's own output comes first
    assert f"python-probe 1 yes: -u -m submitit.core._submit {tmp_path / 'runs' / 'site' / '.slurm'}" in log, log
    script = (log_dir / f"{job}_submission.sh").read_text().splitlines()
    setup = script.index("# setup")
    assert script[setup + 1:setup + 5] == ["export OMP_NUM_THREADS=1", "export ASBATCH_SETUP_PROBE=yes",
                                           "echo setup-ran", "export MY_TOKEN='s3cret value'"]
    shown = dry.submitted[0].flags
    assert shown[-5:] == [*script[setup + 1:setup + 4], "export MY_TOKEN=***", f"python: {python}"]
    assert any(line.startswith("srun ") and line.endswith(f" {python} -u -m submitit.core._submit "
                                                          f"{log_dir.parent / '%j'}") for line in script), script
    assert job_history(job) == ["COMPLETED"]

"""Slurm without accounting: `sacct` missing, failing ('accounting storage is disabled') or answering nothing.
`status`, `wait` and `sweep_status` still give every run a state (results -> COMPLETED, a recorded failure ->
FAILED, squeue -> its live state, else UNKNOWN saying 'no accounting: ...' and what to do), one note, no
traceback; `wait` ends once nothing is live; `retry` resubmits UNKNOWN runs only where squeue answered without
their job (it is gone). Against fake Slurm commands with a failing `sacct` first on PATH, and once on the real
local cluster with its `sacct` shadowed the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from fakeslurm import FakeSlurm

from asbatch.cli import main
from asbatch.launch import LaunchError, retry, submit, sweep_status, wait_for_sweep
from asbatch.rundir import RunDir
from asbatch.spec import load_sweep

CONFIG = {"cpu": True, "data": {"name": "digits", "batch_size": 64}, "model": {"name": "mlp", "width": 8},
          "schedule": {"name": "cosine", "epochs": 2}, "adversarial": {"lam": 0.8, "steps": 1}}
DISABLED = "sacct: error: Slurm accounting storage is disabled"
CONTROLLER_DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


def shadow(tmp_path: Path, monkeypatch, name: str, stderr: str, code: int) -> Path:
    """A script first on PATH in place of Slurm's command `name`: prints `stderr` and exits `code`."""
    bin_dir = tmp_path / f"shadow-{name}"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\n{f'echo {stderr!r} >&2' if stderr else ':'}\nexit {code}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def no_sacct(tmp_path: Path, monkeypatch, how: str) -> None:
    """Accounting off, as a site shows it: no sacct at all, sacct refusing, or sacct answering nothing."""
    if how == "missing":  # PATH: the fake commands (less sacct, plus an srun for submitit to see), the interpreter
        fake_bin = Path(os.environ["FAKE_SLURM_STATE"]).parent / "bin"
        (fake_bin / "sacct").unlink()
        (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
        (fake_bin / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}")
    elif how == "disabled":
        shadow(tmp_path, monkeypatch, "sacct", DISABLED, 1)
    else:  # exit 0, no line: it knows none of the jobs
        shadow(tmp_path, monkeypatch, "sacct", "", 0)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """Five runs submitted to fake Slurm: (squeue RUNNING), (gone, results), (gone, failure record),
    (gone, nothing), (squeue FAILED: still in squeue's memory)."""
    slurm = FakeSlurm(tmp_path / "fake").activate(monkeypatch)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"sweep": "s", "profile": "local", "defaults": CONFIG,
                                    "grid": {"seed": list(range(5))},
                                    "stages": {"train": {"resources": {"time": 5}}}}))
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    jobs = [r.job_id for r in manifest.submissions]
    slurm.set(jobs[0], squeue=("RUNNING", ""))
    for job in jobs[1:4]:
        slurm.set(job, squeue=None)
    slurm.set(jobs[4], squeue=("FAILED", "NonZeroExitCode"))
    runs = [RunDir(r.run_dir) for r in manifest.submissions]
    runs[1].path.mkdir(parents=True)
    runs[1].write_results({"run_id": runs[1].run_id})
    runs[2].write_failure("NonFiniteLossError: loss is nan at global step 12 (epoch 1)")
    return slurm, manifest


@pytest.mark.parametrize("how", ["disabled", "missing", "empty"])
def test_every_run_gets_a_state_and_the_unknown_ones_say_why_and_what_to_do(tmp_path, monkeypatch, sweep, how):
    slurm, manifest = sweep
    no_sacct(tmp_path, monkeypatch, how)
    ids = [r.run_id for r in manifest.submissions]

    status = sweep_status(tmp_path / "runs" / "s")  # strict (as retry reads it): squeue answered, no error

    assert [(r.state, r.source) for r in status.runs] == [
        ("RUNNING", "squeue"), ("COMPLETED", "run dir"), ("FAILED", "failure record"), ("UNKNOWN", ""),
        ("FAILED", "squeue")]
    assert status.runs[2].reason == "NonFiniteLossError: loss is nan at global step 12 (epoch 1)"
    assert status.runs[3].reason == (
        f"no accounting: job {manifest.submissions[3].job_id} has left the queue and Slurm keeps no record of how it "
        f"ended; `asbatch logs {ids[3]} --err` shows it; `asbatch retry` resubmits the run")
    assert [r.active for r in status.runs] == [True, False, False, False, False]
    assert [r.retryable for r in status.runs] == [False, False, True, True, True]
    why = {"disabled": f"sacct failed ({DISABLED})", "missing": "sacct is not on PATH",
           "empty": "sacct knows none of the sweep's jobs (accounting off, or not recording)"}[how]
    assert status.note.startswith(f"{why}: no accounting, so states come from the run dirs and squeue")

    result = CliRunner().invoke(main, ["status", "s", "--runs-root", str(tmp_path / "runs")], terminal_width=200)

    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert [line for line in result.output.splitlines() if line.startswith("note:")] == [f"note: {status.note}"]
    assert f"* {ids[3]} UNKNOWN: no accounting: job" in result.output

    again = retry(tmp_path / "runs" / "s")  # the gone, failed and unknown runs; not the running or finished one

    assert sorted(r for s in again.submitted for r in s.run_ids) == sorted(ids[2:])
    assert len(slurm.calls("sbatch")) == 2


def test_with_squeue_not_answering_either_unknown_runs_are_not_retried(tmp_path, monkeypatch, sweep):
    slurm, _ = sweep
    no_sacct(tmp_path, monkeypatch, "disabled")
    shadow(tmp_path, monkeypatch, "squeue", CONTROLLER_DOWN, 1)

    status = sweep_status(tmp_path / "runs" / "s", strict=False)

    assert [r.state for r in status.runs] == ["UNKNOWN", "COMPLETED", "UNKNOWN", "UNKNOWN", "UNKNOWN"]
    assert status.runs[2].reason.startswith(f"no accounting: sacct failed ({DISABLED}), and squeue did not answer")
    assert not any(r.retryable for r in status.runs), "a job squeue cannot see may still run: never queue it twice"
    assert status.note.startswith(f"Slurm's controller is not answering ({CONTROLLER_DOWN}) and sacct failed")
    with pytest.raises(LaunchError, match=r"^squeue failed"):
        retry(tmp_path / "runs" / "s")
    assert len(slurm.calls("sbatch")) == 1


def test_wait_ends_once_the_last_live_job_leaves_the_queue_and_names_the_runs_that_did_not_complete(
        tmp_path, monkeypatch, sweep):
    slurm, manifest = sweep
    no_sacct(tmp_path, monkeypatch, "disabled")
    polls = []

    def on_poll(st):
        polls.append([r.state for r in st.runs])
        slurm.set(manifest.submissions[0].job_id, squeue=None)  # the running job ends, squeue forgets it

    final = wait_for_sweep(tmp_path / "runs" / "s", poll_s=0.01, timeout_s=30, on_poll=on_poll)

    assert polls[0][0] == "RUNNING" and len(polls) == 2
    assert [r.state for r in final.runs] == ["UNKNOWN", "COMPLETED", "FAILED", "UNKNOWN", "FAILED"]

    result = CliRunner().invoke(main, ["wait", "s", "--runs-root", str(tmp_path / "runs"), "--poll", "0.1",
                                       "--timeout", "30"])

    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert sum(line.split(" ", 1)[1].startswith("note: ") for line in result.output.splitlines()
               if " " in line) == 1, result.output
    assert "4 of 5 runs of s did not complete (FAILED, UNKNOWN)" in result.output
    assert f"{manifest.submissions[3].run_id} (seed=3) UNKNOWN: no accounting: job" in result.output


@pytest.mark.slurm
def test_on_the_local_cluster_with_sacct_shadowed_wait_ends_and_status_gives_each_run_its_state(
        local_slurm, tmp_path, monkeypatch):
    """A finished run and a failed one (SIGKILLed at step 3) on the real cluster, followed with a `sacct` that
    says accounting is disabled: squeue and the run dirs give the states, one note, no traceback."""
    from test_launch import write_spec

    monkeypatch.chdir(tmp_path)
    repo = str(Path(__file__).resolve().parents[1])  # the jobs train this checkout's asbatch
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    root = tmp_path / "runs"
    spec = write_spec(tmp_path / "spec.yaml", "noacct", grid={"seed": [0, 1]})
    good, bad = (r.run_id for r in load_sweep(spec).runs)
    submit(load_sweep(spec), root, executor="slurm", spec_path=spec, only={good})
    monkeypatch.setenv("ASBATCH_FAULT", "step:3")  # sbatch exports it: this task dies at step 3
    submit(load_sweep(spec), root, executor="slurm", spec_path=spec, only={bad})
    monkeypatch.delenv("ASBATCH_FAULT")
    shadow(tmp_path, monkeypatch, "sacct", DISABLED, 1)

    waited = CliRunner().invoke(main, ["wait", "noacct", "--runs-root", str(root), "--poll", "1", "--timeout", "240"])

    assert waited.exit_code == 1 and "Traceback" not in waited.output, waited.output
    assert "1 of 2 runs of noacct did not complete (FAILED)" in waited.output
    status = sweep_status(root / "noacct")
    assert [(r.run_id, r.state, r.source) for r in status.runs] == [
        (good, "COMPLETED", "run dir"), (bad, "FAILED", "squeue")]
    assert status.note.startswith(f"sacct failed ({DISABLED}): no accounting")
    shown = CliRunner().invoke(main, ["status", "noacct", "--runs-root", str(root)], terminal_width=200)
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    assert [line for line in shown.output.splitlines() if line.startswith("note:")] == [f"note: {status.note}"]

"""A `submit` killed between sbatch and its manifest records (issue 22, item 6), injected for real: the submit
runs as a process with `ASBATCH_FAULT=sbatch:<n>` (SIGKILL once its n-th sbatch answered) against the local
Slurm cluster. The intent it saved before sbatch is resolved by the job's name and script dir: `status` lists
the runs with their jobs, `cancel` cancels them, a second `submit` queues nothing and each run trains once.
An intent that Slurm knows no job of is dropped; one that Slurm cannot answer for stops a submit (one line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_launch import TWO_STAGES, epochs_done, last_job_id, queue, sacct, sh, wait_for, write_spec

from asbatch.cli import main
from asbatch.launch import LaunchError, Manifest, submit, sweep_status
from asbatch.launch.manifest import IntentRecord, PlannedRun, now
from asbatch.rundir import SweepDir
from asbatch.spec import load_sweep


def killed_submit(spec: Path, root: Path, at: int, cwd: Path) -> None:
    """`asbatch submit` SIGKILLed right after its `at`-th sbatch answered, before the array's records."""
    env = {**os.environ, "ASBATCH_FAULT": f"sbatch:{at}"}
    proc = subprocess.run([sys.executable, "-m", "asbatch", "submit", str(spec), "--executor", "slurm",
                           "--runs-root", str(root)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr)


def intents_on_disk(sweep_dir: Path) -> list[dict]:
    return json.loads((sweep_dir / "manifest.json").read_text()).get("intents", [])


def active_jobs(array: str) -> list[str]:
    return sh("squeue", "-h", "-r", "-j", array, "-o", "%i", check=False).split()


@pytest.mark.slurm
def test_a_killed_submit_s_jobs_are_listed_and_a_second_submit_queues_nothing(local_slurm, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "killed", grid={"seed": [0, 1]})
    root, since = tmp_path / "runs", last_job_id()
    array = None
    try:
        killed_submit(spec, root, 1, tmp_path)
        jobs = queue(tmp_path, since)
        array = jobs[0].split("|")[0].split("_")[0]
        assert [j.split("|")[0] for j in jobs] == [f"{array}_0", f"{array}_1"], jobs
        (intent,) = intents_on_disk(root / "killed")  # what the kill left: the intent, no records
        assert intent["job_name"] == "killed:train" and Manifest.load(root / "killed").intents == []

        runs = [r.run_id for r in load_sweep(spec).runs]
        status = sweep_status(root / "killed")
        assert [(r.run_id, r.job_id) for r in status.runs] == [(runs[0], f"{array}_0"), (runs[1], f"{array}_1")]
        assert all(r.source in ("squeue", "sacct", "run dir") for r in status.runs), status.runs
        table = CliRunner().invoke(main, ["status", "killed", "--runs-root", str(root)],
                                     env={"COLUMNS": "200"})
        assert table.exit_code == 0 and f"{array}_0" in table.output and f"{array}_1" in table.output, table.output

        again = CliRunner().invoke(main, ["submit", str(spec), "--executor", "slurm", "--runs-root", str(root)])
        assert again.exit_code == 0 and "nothing to submit" in again.output, again.output
        assert [j.split("|")[0] for j in queue(tmp_path, since)] == [f"{array}_0", f"{array}_1"]
        manifest = Manifest.load(root / "killed")
        assert intents_on_disk(root / "killed") == [], "the second submit saved the resolved records"
        assert [a.array_job_id for a in manifest.arrays] == [array]
        assert [(s.run_id, s.job_id) for s in manifest.submissions] == [(runs[0], f"{array}_0"),
                                                                        (runs[1], f"{array}_1")]

        done = wait_for(lambda: (st := sweep_status(root / "killed")) and not any(r.active for r in st.runs) and st,
                        50, "the killed submit's jobs to finish", every=1)
        assert [r.state for r in done.runs] == ["COMPLETED", "COMPLETED"], [(r.run_id, r.reason) for r in done.runs]
        for run_id in runs:  # trained once: 2 epochs, one metrics line each, by one job with one sacct record
            assert epochs_done(root / "killed" / run_id) == 2
        # -D: one record per requeue too; slurmdbd records asynchronously, so wait until it has both ends
        live = ("PENDING", "RUNNING", "COMPLETING")
        records = wait_for(lambda: (rs := sacct([array], "JobID,State", duplicates=True))
                           and {r[0] for r in rs} == {f"{array}_0", f"{array}_1"}
                           and not any(r[1].startswith(live) for r in rs) and rs,
                           30, "sacct to record how both tasks ended", every=1)
        assert sorted(r[0] for r in records) == [f"{array}_0", f"{array}_1"], records
        assert not (root / "killed" / runs[0] / "requeues.json").exists()
    finally:
        if array:
            sh("scancel", array, check=False)


@pytest.mark.slurm
def test_cancel_finds_the_array_of_a_submit_killed_before_its_records(local_slurm, tmp_path):
    """Killed after the second stage's sbatch: its tasks (afterok the first stage) are found and cancelled."""
    spec = write_spec(tmp_path / "spec.yaml", "killed2", stages=TWO_STAGES, grid={"seed": [0, 1]})
    root, since = tmp_path / "runs", last_job_id()
    arrays: list[str] = []
    try:
        killed_submit(spec, root, 2, tmp_path)
        arrays = sorted({j.split("|")[0].split("_")[0] for j in queue(tmp_path, since)}, key=int)
        assert len(arrays) == 2, queue(tmp_path, since)
        manifest = Manifest.load(root / "killed2")
        assert [(a.stage, a.array_job_id, a.dependency) for a in manifest.arrays] == [
            ("pretrain", arrays[0], None), ("fine_tune", arrays[1], f"aftercorr:{arrays[0]}")]
        fine_tune = [s for s in manifest.submissions if s.stage == "fine_tune"]
        assert [(s.job_id, s.dependency) for s in fine_tune] == [(f"{arrays[1]}_{i}", f"afterok:{arrays[0]}_{i}")
                                                                for i in range(2)]

        cancelled = CliRunner().invoke(main, ["cancel", "killed2", "--runs-root", str(root)])
        assert cancelled.exit_code == 0 and arrays[1] in cancelled.output, cancelled.output
        wait_for(lambda: not active_jobs(arrays[1]), 30, "the fine-tune tasks to leave the queue")
        final = wait_for(lambda: (st := sweep_status(root / "killed2")) and not any(r.active for r in st.runs) and st,
                         30, "the cancelled runs to end")
        assert [r.state for r in final.runs if r.stage == "fine_tune"] == ["CANCELLED", "CANCELLED"], final.runs
    finally:
        if arrays:
            sh("scancel", *arrays, check=False)


def _intent(sweep_dir: SweepDir, name: str) -> IntentRecord:
    config = {"schedule": {"epochs": 1}}
    return IntentRecord(stage="train", job_name=name, log_dir=str(sweep_dir.log_dir), since=now(), runs=[PlannedRun(
        run_id="train-0123456789", stage="train", executor="slurm", config=config, run_dir=str(sweep_dir.path / "x"),
        wandb_id="train-0123456789", submitted_at=now())])


@pytest.mark.slurm
def test_an_intent_that_slurm_knows_no_job_of_is_dropped(local_slurm, tmp_path):
    sweep_dir = SweepDir(tmp_path / "never")
    Manifest(sweep_dir, "never", intents=[_intent(sweep_dir, f"never:{tmp_path.name}")]).save()
    manifest = Manifest.load(sweep_dir)  # squeue and sacct answer: no such job, so sbatch never ran
    assert (manifest.intents, manifest.arrays, manifest.submissions, manifest.resolved) == ([], [], [], True)
    manifest.settle()
    assert intents_on_disk(sweep_dir.path) == []


def test_an_intent_that_slurm_cannot_answer_for_stops_a_submit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))  # neither squeue nor sacct
    spec = write_spec(tmp_path / "spec.yaml", "silent")
    sweep_dir = SweepDir(tmp_path / "runs" / "silent")
    Manifest(sweep_dir, "silent", intents=[_intent(sweep_dir, "silent:train")]).save()
    assert len(Manifest.load(sweep_dir).intents) == 1  # kept: it may have been queued
    with pytest.raises(LaunchError, match=r"cannot tell whether the silent:train array of a killed submit was queued"):
        submit(load_sweep(spec), tmp_path / "runs", executor="local")
    cli = CliRunner().invoke(main, ["submit", str(spec), "--executor", "local", "--runs-root", str(tmp_path / "runs")])
    assert cli.exit_code == 1 and len(cli.output.strip().splitlines()) == 1, cli.output  # one line, no traceback
    assert "silent:train array of a killed submit" in cli.output
    assert len(intents_on_disk(sweep_dir.path)) == 1
    assert not sweep_dir.run(load_sweep(spec).runs[0].run_id).path.exists()

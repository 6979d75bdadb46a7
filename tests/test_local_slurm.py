"""The local Slurm cluster really works: job arrays through submitit, 2-node srun steps, sacct states."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit

pytestmark = [pytest.mark.slurm]
TESTS = Path(__file__).resolve().parent


def _sacct_state(job_id: str, timeout: float = 60) -> str:
    """Final state of a job from the accounting database (sacct needs slurmdbd)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        state = out[0] if out else ""
        if state and state not in {"PENDING", "RUNNING", "REQUEUED", "COMPLETING"}:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s (last state {state!r})")


def test_submitit_array_of_four_tasks_returns_four_results(local_slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    import slurm_payloads

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1, mem_gb=0.5)
    jobs = executor.map_array(slurm_payloads.whoami, [1, 2, 3, 4])

    results = [job.result() for job in jobs]

    assert [r["square"] for r in results] == [1, 4, 9, 16]
    assert sorted(r["array_task_id"] for r in results) == [0, 1, 2, 3]
    assert len({r["array_job_id"] for r in results}) == 1, "one array, not four jobs"


def test_two_node_srun_step_runs_one_task_per_node(local_slurm):
    out = subprocess.run(
        ["srun", "-N2", "-n2", "--ntasks-per-node=1", "-t", "1", "bash", "-c",
         'echo "$SLURM_PROCID $SLURMD_NODENAME $SLURM_NNODES"'],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split("\n")
    rows = sorted(line.split() for line in out if line.strip())
    assert rows == [["0", "n1", "2"], ["1", "n2", "2"]]


def test_sacct_reports_final_states_of_finished_jobs(local_slurm, tmp_path):
    def sbatch(script: str) -> str:
        return subprocess.run(
            ["sbatch", "--parsable", "-t", "1", "-o", str(tmp_path / "%j.out"), "--wrap", script],
            capture_output=True, text=True, check=True,
        ).stdout.strip().split(";")[0]

    ok = sbatch("true")
    failed = sbatch("exit 3")

    assert _sacct_state(ok) == "COMPLETED"
    assert _sacct_state(failed) == "FAILED"
    exit_code = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", failed, "-o", "ExitCode"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert exit_code == "3:0"

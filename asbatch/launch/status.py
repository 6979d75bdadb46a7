"""The state of every submitted run: the run dir first (finished = COMPLETED), then Slurm or the process.

A finished run (its results written) is COMPLETED even where Slurm has forgotten its job. Otherwise the state comes from
squeue (live jobs and pending reasons) or sacct (final states); a local executor's run from its process.
A pending task whose array waits (`afterok`) on a failed job can never start: it is recognised at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from asbatch.launch.manifest import Manifest, SubmissionRecord
from asbatch.launch.slurm import ACTIVE, NEVER_RUNS, RETRYABLE, query_slurm
from asbatch.rundir import RESULTS, RunDir, SweepDir


@dataclass
class RunStatus:
    run_id: str
    stage: str
    state: str
    job_id: str | None = None
    executor: str | None = None
    reason: str = ""               # squeue's pending reason, or why the state was inferred
    source: str = ""               # where `state` came from: run dir, squeue, sacct, process
    slurm_state: str | None = None  # Slurm's own view of the job, kept when the run dir overrides `state`
    slurm_source: str | None = None  # squeue (live jobs, pending reasons) or sacct (final states)
    epochs_done: int | None = None
    epochs: int | None = None
    test_acc: float | None = None
    run_dir: str | None = None

    @property
    def finished(self) -> bool:
        return self.source == "run dir"

    @property
    def blocked(self) -> bool:
        """Pending forever: an upstream task failed (`afterok` can never be satisfied)."""
        return self.state == "PENDING" and self.reason.startswith(NEVER_RUNS)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE and not self.blocked

    @property
    def retryable(self) -> bool:
        return not self.finished and (self.state in RETRYABLE or self.blocked)


@dataclass
class SweepStatus:
    sweep: str
    sweep_dir: Path
    runs: list[RunStatus]
    note: str | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            out[r.state] = out.get(r.state, 0) + 1
        return out


def _pid_alive(pid: int) -> bool:
    """Whether a local executor's controller process still runs (not a zombie, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        with contextlib.suppress(OSError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
            if b"submitit" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return False  # the pid was reused
    return True


def _progress(run_dir: RunDir) -> tuple[int | None, float | None]:
    """(epochs done, last test accuracy) from the run's metrics."""
    if not run_dir.metrics_file.exists():
        return None, None
    rows = run_dir.read_metrics()
    if not rows:
        return 0, None
    last = rows[-1]
    return last["epoch"] + 1, last.get("test_acc_mean", last.get("test_acc"))


def _status_of(record: SubmissionRecord, live: dict, final: dict) -> RunStatus:
    run_dir = RunDir(record.run_dir)
    status = RunStatus(run_id=record.run_id, stage=record.stage, state="UNKNOWN", job_id=record.job_id,
                       executor=record.executor, run_dir=str(run_dir.path),
                       epochs=record.config["schedule"]["epochs"])
    status.epochs_done, status.test_acc = _progress(run_dir)
    job = record.job_id
    if status.executor == "slurm":
        sq, sa = live.get(job), final.get(job)
        if sq and (sq[0] in ACTIVE or not sa or sa in ACTIVE):
            reason = sq[1] if sq[0] == "PENDING" and sq[1] not in ("None", "(null)") else ""
            status.state, status.reason, status.source = sq[0], reason, "squeue"
        elif sa:
            status.state, status.source = sa, "sacct"
        if status.source:
            status.slurm_state, status.slurm_source = status.state, status.source
    elif status.executor == "local":
        alive = job.isdigit() and _pid_alive(int(job))
        started = run_dir.is_started()
        status.source = "process"
        if alive:
            status.state = "RUNNING" if started else "PENDING"
        else:
            status.state = "FAILED" if started else "CANCELLED"
            status.reason = "process ended; the run did not finish" + ("" if started else " (never started)")
    else:  # debug: ran in the submitting process
        status.state, status.source = "FAILED", "process"
    if run_dir.is_finished():
        status.state, status.source, status.reason = "COMPLETED", "run dir", ""
    elif status.state == "COMPLETED":  # the job ended well but the run has no results: treat as failed
        status.state, status.reason = "FAILED", f"job completed but the run has no {run_dir.results_file.name}"
    if status.state == "FAILED" and (failure := run_dir.read_failure()):
        status.reason = failure
    return status


def run_statuses(manifest: Manifest) -> tuple[dict[str, RunStatus], str | None]:
    """The status of every run's newest submission, and a note when Slurm's view is partial."""
    latest = list(manifest.latest().values())
    every = [r.job_id for r in manifest.submissions if r.executor == "slurm"]
    have_slurm = bool(shutil.which("squeue"))
    live, final, note = query_slurm(every) if every and have_slurm else ({}, {}, None)
    if every and not have_slurm:
        note = f"squeue is not on PATH: Slurm states unknown; runs with {RESULTS} show as COMPLETED"
    statuses = {r.run_id: _status_of(r, live, final) for r in latest}
    dependency = {a.array_job_id: a.dependency for a in manifest.arrays}
    own = {r.run_id: r.dependency for r in latest if r.dependency is not None}
    tasks: dict[str, list[str]] = {}
    for record in manifest.submissions:
        tasks.setdefault(record.array_job_id, []).append(record.job_id)

    def failed(job: str) -> bool:
        state = (live.get(job) or (None,))[0]
        state = state if state in ACTIVE else final.get(job, state)
        return state in RETRYABLE

    for status in statuses.values():
        if status.state != "PENDING" or status.executor != "slurm":
            continue  # (also where Slurm says DependencyNeverSatisfied itself: name the upstream task)
        waits = own[status.run_id] if status.run_id in own else dependency.get(status.job_id.split("_")[0]) or ""
        deps = waits.removeprefix("afterok:").split(":")
        bad = [task for dep in deps if dep for task in ([dep] if "_" in dep else tasks.get(dep, [dep]))
               if failed(task)]
        if bad:
            status.reason = f"{NEVER_RUNS}: upstream {bad[0]} failed"
    return statuses, note


def sweep_status(sweep_dir: str | Path | SweepDir) -> SweepStatus:
    """Every submitted run's state (see the module docstring); epochs and test accuracy from the run dirs."""
    manifest = Manifest.load(sweep_dir)
    statuses, note = run_statuses(manifest)
    return SweepStatus(manifest.sweep, manifest.sweep_dir.path, list(statuses.values()), note)

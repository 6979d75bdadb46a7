"""The state of every run of a sweep: the run dir first (finished = COMPLETED), then Slurm or the process.

A finished run (its results written) is COMPLETED even where Slurm has forgotten its job. Otherwise the state
comes from squeue (live jobs and pending reasons) or sacct (final states); a local executor's run from its
process. A pending task whose array waits (`afterok`) on a failed job can never start: it is recognised at
once. Runs trained by `asbatch run` (run dirs the manifest does not list, or a sweep without a manifest)
are RUNNING while the process recorded in the run dir lives, FAILED with a failure record, else INTERRUPTED.
A run that stopped without a failure record was stopped from outside (cancel, Ctrl-C, a kill): CANCELLED /
INTERRUPTED, never FAILED. Each run also gets its grid point (the config keys in which the runs of its stage
differ), epochs done, elapsed training time, an ETA while it runs and its final ensembled accuracy.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asbatch.launch.errors import LaunchError
from asbatch.launch.manifest import Manifest, SubmissionRecord
from asbatch.launch.slurm import ACTIVE, ENDED_BECAUSE, NEVER_RUNS, RETRYABLE, SlurmView, query_jobs
from asbatch.names import point_label, sort_key
from asbatch.rundir import RESULTS, RunDir, SweepDir
from asbatch.runshape import epoch_test_acc

UNKNOWN = "UNKNOWN"  # a Slurm run whose job neither squeue nor sacct reports, without results or a failure record
INTERRUPTED = "INTERRUPTED"  # an in-process run (`asbatch run`, the debug executor) stopped before it finished
NOT_A_POINT = ("sweep", "stage", "model.init_from")  # differ between runs without being a grid value


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
    test_acc: float | None = None    # the last epoch's test accuracy (mean weights for a Bayesian net)
    run_dir: str | None = None
    point: str = "-"                 # the grid point: `lam=0.8 seed=1`
    elapsed_s: float | None = None   # training time so far (every segment), or of the whole run once done
    eta_s: float | None = None       # while running: epochs left x mean epoch time (the evaluation not counted)
    final_acc: float | None = None   # once done: the ensembled accuracy of the final S-sample evaluation
    config: dict[str, Any] | None = None
    gone: bool = False               # no accounting, and squeue answered without it: the job is not live any more

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
        """Resubmitted by `retry`: a stopped or blocked run, or an UNKNOWN one whose job is known to be gone
        (no accounting, and squeue answered without it: resubmitting cannot queue it twice)."""
        return not self.finished and (self.state in RETRYABLE or self.state == INTERRUPTED or self.blocked
                                      or (self.state == UNKNOWN and self.gone))


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


def _process_alive(run_dir: RunDir) -> bool:
    """Whether the process recorded in the run dir (by `train`) still trains it: same host, same pid, same
    start time (a reused pid is not it)."""
    import psutil

    record = run_dir.read_process()
    if not record or record.get("host") != socket.gethostname():
        return False
    try:
        proc = psutil.Process(int(record["pid"]))
        same = record.get("create_time") is None or abs(proc.create_time() - float(record["create_time"])) < 1
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _finite(value: float | None) -> float:
    """A metric as a time to add up: a missing or non-finite one (null, NaN in a hand-edited file) counts 0."""
    return value if value is not None and math.isfinite(value) else 0.0


def _fill_progress(status: RunStatus, run_dir: RunDir) -> None:
    """Epochs done, last test accuracy, elapsed time and ETA from the run's metrics; the final accuracy and
    the training time from its results."""
    rows, results = run_dir.read_metrics(), run_dir.read_results()  # damaged files: RunDirError names them
    if run_dir.metrics_file.exists():
        status.epochs_done = rows[-1]["epoch"] + 1 if rows else 0
    if rows:
        status.test_acc = epoch_test_acc(rows[-1])
        steps = rows[0]["global_step"] / (rows[0]["epoch"] + 1)  # steps per epoch
        epoch_times = [_finite(row.get("step_time_s")) * steps for row in rows]
        status.elapsed_s = sum(epoch_times)
    if results:
        status.final_acc = results.get("evaluation", {}).get("ensemble_accuracy")
        status.elapsed_s = results.get("timing", {}).get("train_time_s", status.elapsed_s)
        return
    if status.state == "RUNNING" and run_dir.is_started():
        last = (run_dir.metrics_file if rows else run_dir.config_file).stat().st_mtime
        since = max(0.0, time.time() - max(last, _segment_start(run_dir)))  # not the time spent requeued
        status.elapsed_s = (status.elapsed_s or 0.0) + since
        if rows and status.epochs:
            left = status.epochs - len(rows)
            status.eta_s = max(0.0, sum(epoch_times) / len(rows) * left - since) if left > 0 else 0.0


def _segment_start(run_dir: RunDir) -> float:
    """When the process training the run now started (0 when unknown): its process record's create_time."""
    record = run_dir.read_process() or {}
    value = record.get("create_time")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


def _stopped_state(status: RunStatus, run_dir: RunDir, stopped: str, reason: str) -> None:
    """A run whose process ended before it finished: FAILED where it recorded a failure, else `stopped`."""
    failure = run_dir.read_failure()
    status.state, status.reason = ("FAILED", failure) if failure else (stopped, reason)


def _without_slurm_state(status: RunStatus, run_dir: RunDir, slurm: SlurmView) -> None:
    """A Slurm run that neither squeue nor sacct reports: FAILED with a failure record once its job is known
    to be gone, else UNKNOWN, saying why (no accounting) and what to do."""
    job = status.job_id or ""
    if slurm.gone(job) and (failure := run_dir.read_failure()):
        status.state, status.reason, status.source = "FAILED", failure, "failure record"
        return
    status.reason = slurm.unknown_reason(job, status.run_id)
    status.gone = bool(slurm.no_accounting) and slurm.gone(job)


def _status_of(record: SubmissionRecord, slurm: SlurmView) -> RunStatus:
    run_dir = RunDir(record.run_dir)
    live, final = slurm.live, slurm.final
    status = RunStatus(run_id=record.run_id, stage=record.stage, state=UNKNOWN, job_id=record.job_id,
                       executor=record.executor, run_dir=str(run_dir.path),
                       epochs=record.config["schedule"]["epochs"], config=record.config)
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
        else:
            _without_slurm_state(status, run_dir, slurm)
    elif status.executor == "local":
        alive = job.isdigit() and _pid_alive(int(job))
        started = run_dir.is_started()
        status.source = "process"
        if alive:  # the job's process trains the runs one by one: this one now, or later
            status.state = "RUNNING" if _process_alive(run_dir) else "PENDING"
        elif started:
            _stopped_state(status, run_dir, "CANCELLED", "the process ended before the run finished (cancelled "
                           "or killed); `asbatch retry` resumes it")
        else:
            status.state, status.reason = "CANCELLED", "the process ended before the run started"
    else:  # debug: ran in the submitting process
        status.source = "process"
        _in_process_state(status, run_dir)
    if run_dir.is_finished():
        status.state, status.source, status.reason = "COMPLETED", "run dir", ""
    elif status.state == "COMPLETED":  # the job ended well but the run has no results: treat as failed
        status.state, status.reason = "FAILED", f"job completed but the run has no {run_dir.results_file.name}"
    if status.state == "FAILED" and (failure := run_dir.read_failure()):
        status.reason = failure
    elif status.state in ENDED_BECAUSE and not status.reason:  # every stopped run says why, and what next
        status.reason = f"{ENDED_BECAUSE[status.state]}; `asbatch retry` resumes it"
    _fill_progress(status, run_dir)
    return status


def _in_process_state(status: RunStatus, run_dir: RunDir) -> None:
    if _process_alive(run_dir):
        status.state = "RUNNING"
    else:
        _stopped_state(status, run_dir, INTERRUPTED, "stopped before it finished (Ctrl-C or killed); the same "
                       "`asbatch run` command resumes it")


def run_made_status(run_dir: RunDir) -> RunStatus:
    """The status of a run trained in-process by `asbatch run` (no manifest record): from its run dir only."""
    config = run_dir.read_config(complete=True) or {}  # damaged: RunDirError names it (no garbage grid point)
    status = RunStatus(run_id=run_dir.run_id, stage=str(config.get("stage", run_dir.run_id.rsplit("-", 1)[0])),
                       state="COMPLETED", executor="run", run_dir=str(run_dir.path), source="run dir",
                       epochs=(config.get("schedule") or {}).get("epochs"), config=config or None)
    if not run_dir.is_finished():
        status.source = "process"
        _in_process_state(status, run_dir)
    _fill_progress(status, run_dir)
    return status


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def fill_points(runs: list[RunStatus]) -> dict[str, tuple]:
    """Each run's grid point: the config keys in which the runs of its stage differ (a spec's grid axes,
    plus anything edited or overridden between submissions); section keys (`adversarial.lam`) before
    top-level ones (`seed`). Returns each run's point values, to sort runs by."""
    by_stage: dict[str, list[tuple[RunStatus, dict[str, Any]]]] = {}
    for run in runs:
        if run.config:
            by_stage.setdefault(run.stage, []).append((run, _flat(run.config)))
    order: dict[str, tuple] = {}
    for members in by_stage.values():
        keys = list(dict.fromkeys(k for _, flat in members for k in flat))
        differ = [k for k in keys if k not in NOT_A_POINT and len({repr(f.get(k)) for _, f in members}) > 1]
        differ.sort(key=lambda k: "." not in k)
        for run, flat in members:
            run.point = point_label({k: flat.get(k) for k in differ})
            order[run.run_id] = tuple(sort_key("", flat.get(k)) for k in differ)
    return order


def run_statuses(manifest: Manifest, strict: bool = True) -> tuple[dict[str, RunStatus], str | None]:
    """The status of every run's newest submission, and a note when Slurm's view is partial (`strict`: a
    controller that does not answer is a LaunchError instead; see `query_slurm`)."""
    latest = list(manifest.latest().values())
    every = [r.job_id for r in manifest.submissions if r.executor == "slurm"]
    have_slurm = bool(shutil.which("squeue"))
    slurm = query_jobs(every, strict) if every and have_slurm else SlurmView()
    if every and not have_slurm:
        slurm = SlurmView(squeue_error="squeue is not on PATH", no_accounting="squeue is not on PATH",
                          note=f"squeue is not on PATH: Slurm states unknown; runs with {RESULTS} show as COMPLETED")
    live, final, note = slurm.live, slurm.final, slurm.note
    statuses = {r.run_id: _status_of(r, slurm) for r in latest}
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


def sweep_status(sweep_dir: str | Path | SweepDir, strict: bool = True) -> SweepStatus:
    """Every run's state (see the module docstring): the submitted runs, then the run dirs the manifest does
    not list (trained by `asbatch run`); a sweep without a manifest has only those. `strict=False` (status,
    wait): while Slurm's controller does not answer, the states sacct and the run dirs give, with a note."""
    sweep_dir = sweep_dir if isinstance(sweep_dir, SweepDir) else SweepDir(sweep_dir)
    statuses: dict[str, RunStatus] = {}
    note, name = None, sweep_dir.name
    if sweep_dir.is_submitted():
        manifest = Manifest.load(sweep_dir)
        statuses, note = run_statuses(manifest, strict)
        name = manifest.sweep
    elif not sweep_dir.runs():
        raise LaunchError(f"{sweep_dir.path}: not a sweep (no manifest and no run dirs)")
    submitted = list(statuses.values())  # in the order they were submitted (the spec's order)
    made = [run_made_status(d) for d in sweep_dir.runs() if d.run_id not in statuses]
    order = fill_points([*submitted, *made])
    made.sort(key=lambda r: (r.stage, order.get(r.run_id, ()), r.run_id))  # by grid point
    return SweepStatus(name, sweep_dir.path, [*submitted, *made], note)


def wait_for_sweep(sweep_dir: str | Path | SweepDir, poll_s: float = 10.0, timeout_s: float | None = None,
                   on_poll: Callable[[SweepStatus], None] | None = None) -> SweepStatus:
    """Block until no run of the sweep is queued or running (runs behind a failed upstream run count as
    done: they never start); returns the final status. `on_poll` sees every status read; past `timeout_s`
    a LaunchError says what is still active."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = sweep_status(sweep_dir, strict=False)  # a controller away (restarting): note, keep waiting
        if on_poll is not None:
            on_poll(status)
        active = [r for r in status.runs if r.active]
        if not active:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            raise LaunchError(f"{status.sweep}: {len(active)} run(s) still queued or running after {timeout_s:g} s "
                              f"({', '.join(f'{r.run_id} {r.state}' for r in active[:5])})")
        time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

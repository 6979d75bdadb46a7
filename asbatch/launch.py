"""Launching a sweep: one submitit job array per stage, `afterok` between stages, requeue, a manifest.

    sweep = load_plan("jobs/quickstart.yaml")
    manifest = submit(sweep, "runs")                # returns at once; nothing waits for jobs
    sweep_status("runs/quickstart").runs            # state, epoch, test accuracy per run
    cancel("runs/quickstart"); retry("runs/quickstart")

Executors: `slurm` (sbatch through submitit), `local` (one background process that trains the runs stage
by stage; returns at once), `debug` (in this process, before `submit` returns), `auto` (slurm where
`sbatch` is on PATH, else local).

What lands on disk, per sweep (`<runs root>/<sweep>/`):
- `manifest.json`: every submission (run id, stage, job id `<array>_<task>`, config, run dir, W&B id), and
  one record per array (stage, array job id, dependency). Written atomically under `.submit.lock`. (A
  stage with a single run is a plain job, id `<job>`: submitit submits one run without `--array`.)
- `.slurm/<job id>/`: submitit's pickles, sbatch script and the job's stdout/stderr (`asbatch logs`).
- `<run id>/`: the run dir that `train` owns; `requeues.json` counts the task's self-requeues.

Everything after `submit` (status, logs, cancel, retry) reads the manifest, Slurm (`squeue`, `sacct`) and
the run dirs, never the memory of the process that submitted.

Preemption and time limits. Every task gets Slurm's warning signal (`--signal=USR2@<delay>`, default 90 s,
`$ASBATCH_SIGNAL_DELAY_S`) on all its ranks. `TrainTask` replaces submitit's USR2 handler with one that
only sets a flag; `train` polls it after every optimizer step, the ranks agree (all-reduce), all save a
checkpoint at the same step and `TrainingInterrupted` is raised; then rank 0 requeues the task with
`scontrol requeue` (at most `MAX_REQUEUES` times) and the task exits without a result. submitit's own
handler is not used because it requeues at once on rank 0 while other ranks are mid-step. SIGTERM (scancel,
preemption, `scontrol requeue` from outside) also stops at the next step after a checkpoint, without
requeueing: Slurm decides what happens next. Note that Slurm holds a requeued job for about two minutes
(its credential lifetime) before it may start again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import submitit

from asbatch.fsutil import atomic_write_json
from asbatch.spec import PlannedRun, Resources, StagePlan, Sweep

EXECUTORS = ("auto", "slurm", "local", "debug")
MANIFEST = "manifest.json"
LOCK = ".submit.lock"
LOG_DIR = ".slurm"
REQUEUES = "requeues.json"
MAX_REQUEUES = 20
SIGNAL_DELAY_ENV = "ASBATCH_SIGNAL_DELAY_S"
DEFAULT_SIGNAL_DELAY_S = 90
# Slurm states of a job that is (or will again be) queued or running: its run must not be submitted again
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                    "COMPLETING", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED", "RESV_DEL_HOLD"})
# final states of a run that `retry` resubmits (when the run has no results.json)
RETRYABLE = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                       "BOOT_FAIL", "DEADLINE"})
NEVER_RUNS = "DependencyNeverSatisfied"  # squeue reason of a task whose upstream array failed
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


class LaunchError(RuntimeError):
    """Submission, cancel or retry could not be done; the message says why and what to do."""


# ------------------------------------------------------------------------------------------ the task


class _StopRequest:
    """Signal handlers that only record the signal; `is_set` is what `train(should_stop=...)` polls."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self, signums: Sequence[int]) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {signum: signal.signal(signum, self._handle) for signum in signums}
        return self

    def uninstall(self, in_job: bool) -> None:
        """In a job, ignore USR2 from now on: Python resets its own handlers to the default (terminate)
        while the interpreter shuts down, and a warning signal arriving then would turn a finished task
        into a FAILED one (and block the `afterok` arrays after it). Elsewhere, restore the handlers."""
        for signum, previous in self._previous.items():
            if in_job:
                if signum == signal.SIGUSR2:
                    signal.signal(signum, signal.SIG_IGN)
            elif previous is not None:
                signal.signal(signum, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None or signum == signal.SIGTERM:  # TERM wins: Slurm is ending the job anyway
            self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait_for_term(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.signum != signal.SIGTERM and time.monotonic() < deadline:
            time.sleep(0.2)


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0)


def _master_address(host: str) -> str:
    """The first node's address: its name if that resolves, else Slurm's NodeAddr for it."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = _run(["scontrol", "show", "node", host, "-o"], timeout=30).stdout
        match = re.search(r"\bNodeAddr=(\S+)", out)
        if match:
            return match.group(1)
    return host


def export_distributed_env() -> None:
    """In a multi-task Slurm job, export what torch.distributed's env:// init (and Accelerate) read:
    MASTER_ADDR (first host of the job), MASTER_PORT (20000-29999 from the job id), RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE. A no-op in a single-task job."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 10000)
    dist = submitit.helpers.TorchDistributedEnvironment()
    dist.export(set_cuda_visible_devices=False, overwrite=True)  # each rank picks cuda:LOCAL_RANK
    os.environ["MASTER_ADDR"] = _master_address(dist.master_addr)


def _count_requeue(run_dir: Path, step: int | None, via: str) -> int | None:
    """Add one requeue to `<run dir>/requeues.json`; None (and nothing written) at the limit."""
    path = run_dir / REQUEUES
    record = json.loads(path.read_text()) if path.exists() else {"count": 0, "events": []}
    if record["count"] >= MAX_REQUEUES:
        return None
    record["count"] += 1
    record["events"].append({"job_id": os.environ.get("SLURM_JOB_ID"), "array_task": _task_job_id(), "step": step,
                             "via": via, "at": _now()})
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return record["count"]


def _requeue_self(run_dir: Path, step: int) -> str:
    """rank 0 after every rank saved: count, then `scontrol requeue` this task. Returns what was done."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return "not under Slurm: not requeued; submit again to resume"
    count = _count_requeue(run_dir, step, "scontrol requeue")
    if count is None:
        return f"requeued {MAX_REQUEUES} times already: not requeued; `asbatch retry` resumes it"
    proc = _run(["scontrol", "requeue", job])
    if proc.returncode != 0:
        return f"`scontrol requeue {job}` failed: {(proc.stderr or proc.stdout).strip()}"
    return f"requeued job {job} ({count}/{MAX_REQUEUES})"


def _task_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


class TrainTask:
    """The callable submitted for one run: `train(config, run_dir)` with preemption handled.

    Picklable (a config dict and a path). `__call__` replaces submitit's USR2 handler (and SIGTERM's) with
    one that only sets a flag, exports the torch.distributed variables in a multi-task job, and trains.
    When training stops on USR2 (time limit or preemption warning), every rank has saved a checkpoint at
    the same step; rank 0 then requeues the task itself (bounded by `MAX_REQUEUES`) and the task exits
    without a result, so submitit does not consider it done. On SIGTERM it exits after saving too, without
    requeueing (scancel, or Slurm requeues it itself).

    `checkpoint()` is submitit's hook, kept as a fallback: it is only called when USR2 arrives before
    `__call__` installed its handler (training has not started then), and resubmits the same task, which
    resumes from the newest checkpoint anyway.
    """

    def __init__(self, config: dict[str, Any], run_dir: str | Path, env: dict[str, str] | None = None):
        self.config = config
        self.run_dir = str(run_dir)
        self.env = dict(env or {})  # only set where the job script did not export it (local / debug)

    def __call__(self) -> dict[str, Any]:
        stop = _StopRequest().install([signal.SIGUSR2, signal.SIGTERM])
        for key, value in self.env.items():
            os.environ.setdefault(key, value)
        export_distributed_env()
        from asbatch.config import RunConfig
        from asbatch.train import TrainingInterrupted, train

        config = RunConfig.model_validate(self.config)
        in_job = os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local")
        try:
            return train(config, self.run_dir, should_stop=stop.is_set)
        except TrainingInterrupted as err:
            name = signal.Signals(stop.signum).name if stop.signum else "a stop request"
            warned = stop.signum == signal.SIGUSR2
            if warned and _rank() == 0:
                done = _requeue_self(Path(self.run_dir), err.step)
            elif warned:
                done = "rank 0 requeues the task"
            else:
                done = "not requeued by the task (Slurm ends or requeues it)"
            print(f"[asbatch] {config.run_id}: {name} -> checkpoint at step {err.step}; {done}", flush=True)
            if warned and (_rank() != 0 or done.startswith("requeued job")):
                stop.wait_for_term(60)  # let the requeue end the step: no rank should look failed first
            # SystemExit is not an Exception: submitit writes no result, the job is not done
            raise SystemExit(f"[asbatch] {config.run_id} stopped at step {err.step} ({name}); {done}") from None
        finally:
            stop.uninstall(in_job)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        if _count_requeue(Path(self.run_dir), None, "submitit checkpoint()") is None:
            return None  # submitit then ends the job instead of requeueing it
        return submitit.helpers.DelayedSubmission(self)

    def __repr__(self) -> str:
        return f"TrainTask({Path(self.run_dir).name})"


class SequentialTask:
    """The local and debug executors' callable: train runs one after another, in stage order.

    A run whose upstream run did not finish is not started (Slurm's `afterok`). Raises at the end when any
    run failed, so the job's result says so; finished runs stay finished.
    """

    def __init__(self, items: list[tuple[TrainTask, list[str]]]):
        self.items = items  # (task, run dirs of its upstream runs)

    def __call__(self) -> dict[str, str]:
        outcome: dict[str, str] = {}
        for task, upstream in self.items:
            name = Path(task.run_dir).name
            missing = [u for u in upstream if not (Path(u) / "results.json").exists()]
            if missing:
                outcome[name] = f"not run: upstream {', '.join(Path(m).name for m in missing)} did not finish"
                continue
            try:
                task()
                outcome[name] = "COMPLETED"
            except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
                import traceback
                traceback.print_exc()
                outcome[name] = f"FAILED: {type(err).__name__}: {err}"
        print(json.dumps(outcome, indent=1), flush=True)
        failed = {k: v for k, v in outcome.items() if v != "COMPLETED"}
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(outcome)} runs did not finish: {failed}")
        return outcome

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)


# ------------------------------------------------------------------------------------------ parameters


def signal_delay_s(resources: Resources) -> int:
    """Seconds before the time limit at which USR2 comes: $ASBATCH_SIGNAL_DELAY_S or 90, at most half the
    limit (Slurm checks limits only every 30 s or so, so short jobs get the signal early anyway)."""
    delay = int(os.environ.get(SIGNAL_DELAY_ENV, DEFAULT_SIGNAL_DELAY_S))
    return max(1, min(delay, resources.timeout_min * 30))


def env_lines(env: dict[str, str]) -> list[str]:
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]


def executor_parameters(sweep: str, stage: StagePlan, env: dict[str, str], dependency: str | None = None,
                        kind: str = "slurm", num_runs: int | None = None) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one stage's array (generic names + `slurm_`/`local_` ones)."""
    r = stage.resources
    params: dict[str, Any] = {"name": f"{sweep}:{stage.name}", "timeout_min": r.timeout_min}
    if kind == "slurm":
        params.update(nodes=r.nodes, tasks_per_node=max(1, r.gpus_per_node), cpus_per_task=r.cpus_per_task,
                      slurm_signal_delay_s=signal_delay_s(r), slurm_array_parallelism=r.array_parallelism)
        if r.gpus_per_node:
            params["gpus_per_node"] = r.gpus_per_node
        if r.mem_gb is not None:
            params["mem_gb"] = float(r.mem_gb)
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(r, name) is not None:
                params[f"slurm_{name}"] = getattr(r, name)
        extra: dict[str, Any] = {flag: True if value == "" else value for flag, value in r.extra.items()}
        if dependency:
            extra["dependency"] = dependency
        if extra:
            params["slurm_additional_parameters"] = extra
        if env:
            params["slurm_setup"] = env_lines(env)
    else:  # local / debug: one process trains every run in turn; its time limit is the sum of theirs, and
        # TrainTask sets the env itself (before torch is imported)
        params["timeout_min"] = r.timeout_min * max(1, num_runs or len(stage.runs))
    return params


def sbatch_flags(params: dict[str, Any], num_tasks: int, log_dir: Path) -> list[str]:
    """The sbatch flags submitit will write for these parameters (for `--dry-run`); env values that look
    like secrets are masked."""
    native = {"job-name": params["name"], "time": params["timeout_min"]}
    for key, flag in (("slurm_partition", "partition"), ("slurm_account", "account"), ("slurm_qos", "qos"),
                      ("nodes", "nodes"), ("tasks_per_node", "ntasks-per-node"), ("cpus_per_task", "cpus-per-task"),
                      ("gpus_per_node", "gpus-per-node"), ("slurm_constraint", "constraint")):
        if key in params:
            native[flag] = params[key]
    if "mem_gb" in params:
        mem = params["mem_gb"]
        native["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    if num_tasks > 1:
        native["array"] = f"0-{num_tasks - 1}%{min(num_tasks, params.get('slurm_array_parallelism', 256))}"
    native["signal"] = f"USR2@{params.get('slurm_signal_delay_s', DEFAULT_SIGNAL_DELAY_S)}"
    job = "%A_%a" if num_tasks > 1 else "%j"
    native["output"] = str(log_dir / job / f"{job}_%t_log.out")
    native["error"] = str(log_dir / job / f"{job}_%t_log.err")
    native.update(params.get("slurm_additional_parameters", {}))
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in native.items()]
    for line in params.get("slurm_setup", []):
        name, _, value = line.removeprefix("export ").partition("=")
        flags.append(f"export {name}={'***' if _SECRET.search(name) else value}")
    return flags


# ------------------------------------------------------------------------------------------ manifest


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StageSubmission:
    """One stage's array as submitted now (or, in a dry run, as it would be)."""

    stage: str
    executor: str
    run_ids: list[str]
    parameters: dict[str, Any]
    flags: list[str]
    log_dir: str
    dependency: str | None = None
    array_job_id: str | None = None
    job_ids: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # run id -> why it was not submitted


@dataclass
class Manifest:
    """`<runs root>/<sweep>/manifest.json`: what was submitted, for status, logs, cancel and retry.

    `submissions` holds one record per submitted run (the newest per run id counts); `arrays` one per
    submitted array. `submitted` is what the call that returned this manifest submitted (not saved).
    """

    path: Path
    sweep: str
    spec: str | None = None
    arrays: list[dict[str, Any]] = field(default_factory=list)
    submissions: list[dict[str, Any]] = field(default_factory=list)
    submitted: list[StageSubmission] = field(default_factory=list)
    dry_run: bool = False

    @property
    def sweep_dir(self) -> Path:
        return self.path.parent

    @classmethod
    def load(cls, sweep_dir: str | Path) -> Manifest:
        path = Path(sweep_dir) / MANIFEST
        if not path.exists():
            raise LaunchError(f"{sweep_dir}: no {MANIFEST} (nothing was submitted for this sweep here)")
        data = json.loads(path.read_text())
        return cls(path=path, sweep=data["sweep"], spec=data.get("spec"), arrays=data.get("arrays", []),
                   submissions=data.get("submissions", []))

    @classmethod
    def load_or_new(cls, sweep_dir: Path, sweep: str, spec: str | None) -> Manifest:
        if (sweep_dir / MANIFEST).exists():
            manifest = cls.load(sweep_dir)
            manifest.spec = spec or manifest.spec
            return manifest
        return cls(path=sweep_dir / MANIFEST, sweep=sweep, spec=spec)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"sweep": self.sweep, "spec": self.spec, "arrays": self.arrays,
                                       "submissions": self.submissions})

    def latest(self) -> dict[str, dict[str, Any]]:
        """run id -> its newest submission record, in first-submitted order."""
        out: dict[str, dict[str, Any]] = {}
        for record in self.submissions:
            out[record["run_id"]] = record  # a dict keeps a key's first position when its value changes
        return out

    def job_ids(self) -> list[str]:
        return [r["job_id"] for r in self.latest().values()]


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Exclusive `flock` on `<sweep dir>/.submit.lock`: read manifest -> submit -> write manifest is atomic
    with respect to other submits, retries and cancels of the same sweep (other processes or threads)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ job states


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def _parse_job_lines(lines: Sequence[str]) -> dict[str, list[str]]:
    """'123_4|RUNNING|None', '123_[5-7%2]|PENDING|...', '123|CANCELLED by 0' -> {'123_4': [...], ...}; an
    array record without a task ('123', a never-started array) is kept under '123'."""
    out: dict[str, list[str]] = {}
    for line in lines:
        if not line.strip():
            continue
        job, *fields = line.split("|")
        fields = [fields[0].split()[0] if fields and fields[0] else "", *fields[1:]]  # 'CANCELLED by 0'
        match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job)
        if match:
            for part in match.group(2).split(","):
                lo, _, hi = part.partition("-")
                for task in range(int(lo), int(hi or lo) + 1):
                    out.setdefault(f"{match.group(1)}_{task}", fields)
        elif re.fullmatch(r"\d+(_\d+)?", job):
            out[job] = fields
    return out


def _lookup(table: dict[str, list[str]], job_id: str) -> list[str] | None:
    return table.get(job_id) or table.get(job_id.split("_")[0])


def query_slurm(job_ids: Sequence[str]) -> tuple[dict[str, tuple[str, str]], dict[str, str], str | None]:
    """For job ids ('123_4' or '123'): (live {id: (state, reason)} from `squeue -t all`, final {id: state}
    from `sacct`, a note when sacct is unavailable)."""
    arrays = sorted({j.split("_")[0] for j in job_ids}, key=int)
    if not arrays:
        return {}, {}, None
    ids = ",".join(arrays)
    live: dict[str, tuple[str, str]] = {}
    sq = _run(["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T|%r"])
    if sq.returncode == 0:
        table = _parse_job_lines(sq.stdout.splitlines())
        live = {j: (f[0], f[1] if len(f) > 1 else "") for j in job_ids if (f := _lookup(table, j))}
    elif "Invalid job id" not in sq.stderr:
        raise LaunchError(f"squeue failed: {(sq.stderr or sq.stdout).strip()}")
    note = None
    final: dict[str, str] = {}
    sa = _run(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State"])
    if sa.returncode == 0:
        table = _parse_job_lines(sa.stdout.splitlines())
        final = {j: f[0] for j in job_ids if (f := _lookup(table, j))}
    else:
        note = (f"sacct failed ({(sa.stderr or sa.stdout).strip() or f'exit {sa.returncode}'}): states come "
                "from squeue only, which forgets finished jobs after MinJobAge; runs without results.json "
                "whose job is gone show as UNKNOWN")
    return live, final, note


def _pid_state(pid: int) -> str | None:
    """'alive' / None for a local executor's controller process."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return None
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        with contextlib.suppress(OSError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"submitit" not in cmdline:
                return None  # the pid was reused
    return "alive"


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


def _progress(run_dir: Path) -> tuple[int | None, float | None]:
    """(epochs done, last test accuracy) from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return 0, None
    last = rows[-1]
    return last["epoch"] + 1, last.get("test_acc_mean", last.get("test_acc"))


def _status_of(record: dict[str, Any], live: dict, final: dict) -> RunStatus:
    run_dir = Path(record["run_dir"])
    status = RunStatus(run_id=record["run_id"], stage=record["stage"], state="UNKNOWN", job_id=record["job_id"],
                       executor=record.get("executor"), run_dir=str(run_dir),
                       epochs=record["config"]["schedule"]["epochs"])
    status.epochs_done, status.test_acc = _progress(run_dir)
    job = record["job_id"]
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
        alive = _pid_state(int(job)) if job.isdigit() else None
        started = (run_dir / "config.yaml").exists()
        status.source = "process"
        if alive:
            status.state = "RUNNING" if started else "PENDING"
        else:
            status.state = "FAILED" if started else "CANCELLED"
            status.reason = "process ended; the run did not finish" + ("" if started else " (never started)")
    else:  # debug: ran in the submitting process
        status.state, status.source = "FAILED", "process"
    if (run_dir / "results.json").exists():
        status.state, status.source, status.reason = "COMPLETED", "run dir", ""
    elif status.state == "COMPLETED":  # the job ended well but the run has no results: treat as failed
        status.state, status.reason = "FAILED", "job completed but the run has no results.json"
    return status


def _statuses(manifest: Manifest) -> tuple[dict[str, RunStatus], str | None]:
    """The status of every run's newest submission, and a note when Slurm's view is partial.

    A pending task whose array waits (`afterok`) on a job that failed can never start; Slurm marks it
    DependencyNeverSatisfied only at its next scheduling pass, so it is recognised here at once, from the
    recorded dependency and the states of the jobs it names."""
    latest = list(manifest.latest().values())
    every = [r["job_id"] for r in manifest.submissions if r.get("executor") == "slurm"]
    have_slurm = bool(shutil.which("squeue"))
    live, final, note = query_slurm(every) if every and have_slurm else ({}, {}, None)
    if every and not have_slurm:
        note = "squeue is not on PATH: Slurm states unknown; runs with results.json show as COMPLETED"
    statuses = {r["run_id"]: _status_of(r, live, final) for r in latest}
    dependency = {a["array_job_id"]: a.get("dependency") for a in manifest.arrays}
    tasks: dict[str, list[str]] = {}
    for record in manifest.submissions:
        tasks.setdefault(record["array_job_id"], []).append(record["job_id"])

    def failed(job: str) -> bool:
        state = (live.get(job) or (None,))[0]
        state = state if state in ACTIVE else final.get(job, state)
        return state in RETRYABLE

    for status in statuses.values():
        if status.state != "PENDING" or status.executor != "slurm" or status.blocked:
            continue
        deps = (dependency.get(status.job_id.split("_")[0]) or "").removeprefix("afterok:").split(":")
        bad = [task for dep in deps if dep for task in ([dep] if "_" in dep else tasks.get(dep, [dep]))
               if failed(task)]
        if bad:
            status.reason = f"{NEVER_RUNS}: upstream {bad[0]} failed"
    return statuses, note


def sweep_status(sweep_dir: str | Path) -> SweepStatus:
    """Every submitted run's state: results.json -> COMPLETED (even without Slurm); else Slurm's state
    (squeue for live jobs and pending reasons, sacct for final states); epochs and test accuracy from
    metrics.jsonl."""
    sweep_dir = Path(sweep_dir)
    manifest = Manifest.load(sweep_dir)
    statuses, note = _statuses(manifest)
    return SweepStatus(manifest.sweep, sweep_dir, list(statuses.values()), note)


def states(sweep_dir: str | Path) -> dict[str, str]:
    """{run id: state} for every submitted run of the sweep (see `sweep_status`)."""
    return {r.run_id: r.state for r in sweep_status(sweep_dir).runs}


def list_sweeps(runs_root: str | Path) -> list[Path]:
    """Sweep dirs under a runs root (those with a manifest)."""
    root = Path(runs_root)
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}")) if root.is_dir() else []


# ------------------------------------------------------------------------------------------ submit


def resolve_executor(kind: str) -> str:
    if kind not in EXECUTORS:
        raise LaunchError(f"unknown executor {kind!r} (one of {', '.join(EXECUTORS)})")
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if kind == "slurm" and not shutil.which("sbatch"):
        raise LaunchError("executor 'slurm': sbatch is not on PATH (use --executor local on a machine without Slurm)")
    return kind


def _log_dir(sweep_dir: Path) -> Path:
    return sweep_dir / LOG_DIR


def log_paths(sweep_dir: str | Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    """(stdout, stderr) submitit writes for a job (`123_4` or a local pid) and task (rank)."""
    paths = submitit.core.utils.JobPaths(_log_dir(Path(sweep_dir)) / "%j", job_id=job_id, task_id=task)
    return paths.stdout, paths.stderr


@dataclass
class _StagePlan:
    stage: StagePlan
    runs: list[PlannedRun]
    skipped: dict[str, str]
    old_deps: set[str]          # job ids of still-queued upstream tasks
    new_deps: set[str]          # upstream stages submitted in this call
    blocked_jobs: list[str]     # old tasks of these runs that can never start: cancelled first


def _plan(sweep: Sweep, sweep_dir: Path, kind: str, manifest: Manifest, stages: Sequence[str] | None,
          only: set[str] | None) -> list[_StagePlan]:
    status, _ = _statuses(manifest)
    finished = {run.run_id for run in sweep.runs if (sweep_dir / run.run_id / "results.json").exists()}
    plans: list[_StagePlan] = []
    submitted_now: dict[str, set[str]] = {}
    for stage in sweep.stages:
        if stages and stage.name not in stages:
            continue
        runs, skipped, old, new, blocked = [], {}, set(), set(), []
        for run in stage.runs:
            if only is not None and run.run_id not in only:
                continue
            st = status.get(run.run_id)
            if run.run_id in finished:
                skipped[run.run_id] = "finished (results.json)"
                continue
            if st is not None and st.active:
                skipped[run.run_id] = f"already queued as {st.job_id} ({st.state})"
                continue
            for up_stage, up_id in run.upstream.items():
                up = status.get(up_id)
                if up_id in finished:
                    continue
                if up_id in submitted_now.get(up_stage, set()):
                    new.add(up_stage)
                elif up is not None and up.active and up.executor == "slurm" and kind == "slurm":
                    old.add(up.job_id)
                elif up is not None and up.active:
                    raise LaunchError(f"stage {stage.name}: upstream run {up_id} ({up_stage}) is still running "
                                      f"under the {up.executor} executor; wait for it, then submit again")
                else:
                    raise LaunchError(f"stage {stage.name}: run {run.run_id} needs run {up_id} of stage "
                                      f"{up_stage!r}, which has not finished and is not queued; submit stage "
                                      f"{up_stage!r} too")
            if st is not None and st.blocked:
                blocked.append(st.job_id)
            runs.append(run)
        submitted_now[stage.name] = {r.run_id for r in runs}
        plans.append(_StagePlan(stage, runs, skipped, old, new, blocked))
    return plans


def _dependency(plan: _StagePlan, arrays: dict[str, str]) -> str | None:
    ids = [arrays[s] for s in plan.stage.after if s in plan.new_deps and s in arrays]
    ids += sorted(plan.old_deps, key=lambda j: [int(x) for x in j.split("_")])
    return f"afterok:{':'.join(ids)}" if ids else None


def submit(sweep: Sweep, runs_root: str | Path, executor: str = "auto", stages: Sequence[str] | None = None,
           dry_run: bool = False, spec_path: str | Path | None = None, only: set[str] | None = None) -> Manifest:
    """Submit every run of `sweep` that has not finished and is not queued: one job array per stage, each
    after (`afterok`) the arrays of its upstream runs. Returns at once with the updated manifest; its
    `submitted` lists the arrays of this call. `dry_run` plans and returns without submitting or writing.
    `only` restricts the submission to these run ids (what `retry` uses)."""
    kind = resolve_executor(executor)
    unknown = set(stages or ()) - {s.name for s in sweep.stages}
    if unknown:
        raise LaunchError(f"unknown stage {min(unknown)!r} (stages: {', '.join(s.name for s in sweep.stages)})")
    runs_root = Path(runs_root).resolve()
    sweep_dir = runs_root / sweep.name
    spec = str(Path(spec_path).resolve()) if spec_path else None
    if dry_run:
        manifest = (Manifest.load_or_new(sweep_dir, sweep.name, spec) if (sweep_dir / MANIFEST).exists()
                    else Manifest(path=sweep_dir / MANIFEST, sweep=sweep.name, spec=spec))
        return _submit_locked(sweep, sweep_dir, kind, manifest, stages, only, dry_run=True)
    with sweep_lock(sweep_dir):
        manifest = Manifest.load_or_new(sweep_dir, sweep.name, spec)
        return _submit_locked(sweep, sweep_dir, kind, manifest, stages, only, dry_run=False)


def _submit_locked(sweep: Sweep, sweep_dir: Path, kind: str, manifest: Manifest, stages: Sequence[str] | None,
                   only: set[str] | None, dry_run: bool) -> Manifest:
    plans = _plan(sweep, sweep_dir, kind, manifest, stages, only)
    manifest.dry_run = dry_run
    log_dir = _log_dir(sweep_dir)
    subs = []
    for plan in plans:
        deps = _dependency(plan, {s: f"<{s} array>" for s in plan.new_deps}) if kind == "slurm" else None
        params = executor_parameters(sweep.name, plan.stage, sweep.env, deps, kind, len(plan.runs))
        subs.append(StageSubmission(stage=plan.stage.name, executor=kind, run_ids=[r.run_id for r in plan.runs],
                                    parameters=params, flags=sbatch_flags(params, len(plan.runs), log_dir)
                                    if kind == "slurm" else [], log_dir=str(log_dir), dependency=deps,
                                    skipped=plan.skipped))
    manifest.submitted = subs
    if dry_run or not any(p.runs for p in plans):
        return manifest
    if kind == "slurm":
        _submit_slurm(sweep, sweep_dir, manifest, plans, subs)
    else:
        _submit_sequential(sweep, sweep_dir, kind, manifest, plans, subs)
    return manifest


def _record(manifest: Manifest, sub: StageSubmission, plan: _StagePlan, sweep_dir: Path, job_ids: list[str],
            array_id: str) -> None:
    at = _now()
    sub.array_job_id, sub.job_ids = array_id, job_ids
    manifest.arrays.append({"stage": sub.stage, "executor": sub.executor, "array_job_id": array_id,
                            "dependency": sub.dependency, "run_ids": sub.run_ids, "submitted_at": at,
                            "log_dir": sub.log_dir})
    for run, job_id in zip(plan.runs, job_ids, strict=True):
        manifest.submissions.append({
            "run_id": run.run_id, "stage": sub.stage, "executor": sub.executor, "job_id": job_id,
            "array_job_id": array_id, "config": run.config.to_dict(), "upstream": run.upstream,
            "run_dir": str(sweep_dir / run.run_id), "wandb_id": run.run_id, "submitted_at": at})


def _submit_slurm(sweep: Sweep, sweep_dir: Path, manifest: Manifest, plans: list[_StagePlan],
                  subs: list[StageSubmission]) -> None:
    arrays: dict[str, str] = {}
    stale = [job for plan in plans for job in plan.blocked_jobs]
    if stale:  # tasks that wait on a failed upstream array forever; their runs are submitted again below
        _run(["scancel", *stale])
    try:
        for plan, sub in zip(plans, subs, strict=True):
            if not plan.runs:
                continue
            sub.dependency = _dependency(plan, arrays)
            params = executor_parameters(sweep.name, plan.stage, sweep.env, sub.dependency, "slurm")
            sub.parameters, sub.flags = params, sbatch_flags(params, len(plan.runs), _log_dir(sweep_dir))
            ex = submitit.AutoExecutor(folder=_log_dir(sweep_dir) / "%j", cluster="slurm")
            ex.update_parameters(**params)
            tasks = [TrainTask(run.config.to_dict(), sweep_dir / run.run_id) for run in plan.runs]
            with ex.batch():
                jobs = [ex.submit(task) for task in tasks]
            job_ids = [job.job_id for job in jobs]
            arrays[plan.stage.name] = job_ids[0].split("_")[0]
            _record(manifest, sub, plan, sweep_dir, job_ids, arrays[plan.stage.name])
            manifest.save()  # after each array: a failure later still leaves a true manifest
    except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
        manifest.save()
        detail = getattr(err, "stderr", None) or getattr(err, "output", None) or err
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        done = ", ".join(f"{s}: {a}" for s, a in arrays.items()) or "nothing"
        raise LaunchError(f"sbatch failed for stage {plan.stage.name!r}: {str(detail).strip()} "
                          f"(submitted before the failure: {done})") from err


def _submit_sequential(sweep: Sweep, sweep_dir: Path, kind: str, manifest: Manifest, plans: list[_StagePlan],
                       subs: list[StageSubmission]) -> None:
    """local / debug: one job that trains every planned run in stage order."""
    items = []
    for plan in plans:
        for run in plan.runs:
            task = TrainTask(run.config.to_dict(), sweep_dir / run.run_id, env=sweep.env)
            items.append((task, [str(sweep_dir / up) for up in run.upstream.values()]))
    first = next(p for p in plans if p.runs)
    params = executor_parameters(sweep.name, first.stage, sweep.env, None, kind, len(items))
    params["timeout_min"] = sum(p.stage.resources.timeout_min * len(p.runs) for p in plans)
    ex = submitit.AutoExecutor(folder=_log_dir(sweep_dir) / "%j", cluster=kind)
    ex.update_parameters(**{k: v for k, v in params.items() if k in ("name", "timeout_min")})
    job = ex.submit(SequentialTask(items))
    for plan, sub in zip(plans, subs, strict=True):
        if plan.runs:
            _record(manifest, sub, plan, sweep_dir, [str(job.job_id)] * len(plan.runs), str(job.job_id))
    manifest.save()
    if kind == "debug":
        with contextlib.suppress(Exception):  # failures are visible in the run states and the job's log
            job.result()


# ------------------------------------------------------------------------------------------ cancel / retry


def cancel(sweep_dir: str | Path) -> list[str]:
    """Cancel the sweep's queued and running jobs (`scancel` of the arrays that still have active tasks;
    SIGTERM to a local executor's process). Returns the job ids cancelled."""
    sweep_dir = Path(sweep_dir)
    Manifest.load(sweep_dir)  # a sweep that was never submitted: say so (and create nothing)
    with sweep_lock(sweep_dir):
        status = sweep_status(sweep_dir)
        active = [r for r in status.runs if r.state in ACTIVE]
        slurm_ids = sorted({r.job_id.split("_")[0] for r in active if r.executor == "slurm"}, key=int)
        if slurm_ids:
            proc = _run(["scancel", *slurm_ids])
            if proc.returncode != 0:
                raise LaunchError(f"scancel {' '.join(slurm_ids)} failed: {(proc.stderr or proc.stdout).strip()}")
        pids = sorted({r.job_id for r in active if r.executor == "local"})
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
        return [*slurm_ids, *pids]


def retry(sweep_dir: str | Path, executor: str | None = None) -> Manifest:
    """Submit again the runs that failed, were cancelled, timed out, lost their node or ran out of memory
    (and have no results.json), plus runs whose tasks wait on a failed upstream forever. One array per
    stage again, after the still-running upstream tasks. The configs and resources come from the spec the
    sweep was submitted from."""
    from asbatch.spec import SpecError, load_plan

    sweep_dir = Path(sweep_dir)
    manifest = Manifest.load(sweep_dir)
    status = sweep_status(sweep_dir)
    todo = {r.run_id for r in status.runs if r.retryable}
    if not manifest.spec:
        raise LaunchError(f"{manifest.path} does not name the spec it came from; run `asbatch submit SPEC`")
    try:
        sweep = load_plan(manifest.spec)
    except (SpecError, OSError) as err:
        raise LaunchError(f"retry needs the sweep's spec {manifest.spec}: {err}") from None
    if sweep.name != manifest.sweep:
        raise LaunchError(f"{manifest.spec} is now sweep {sweep.name!r}, not {manifest.sweep!r}")
    gone = todo - {r.run_id for r in sweep.runs}
    if gone:
        raise LaunchError(f"runs {', '.join(sorted(gone))} are no longer in {manifest.spec} (edited since "
                          "submission?); submit the spec instead")
    kind = executor or (manifest.arrays[-1]["executor"] if manifest.arrays else "auto")
    if not todo:
        manifest.submitted = []
        return manifest
    return submit(sweep, sweep_dir.parent, executor=kind, spec_path=manifest.spec, only=todo)


__all__ = ["ACTIVE", "EXECUTORS", "MAX_REQUEUES", "RETRYABLE", "LaunchError", "Manifest", "RunStatus",
           "SequentialTask", "StageSubmission", "SweepStatus", "TrainTask", "cancel", "executor_parameters",
           "export_distributed_env", "list_sweeps", "log_paths", "query_slurm", "resolve_executor", "retry",
           "sbatch_flags", "signal_delay_s", "states", "submit", "sweep_status"]

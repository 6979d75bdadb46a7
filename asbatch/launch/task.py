"""What runs on the compute node: the submitted callables, signal handling, distributed env and requeue.

Every task gets Slurm's warning signal (`--signal=USR2@<delay>`) on all its ranks. `TrainTask` replaces
submitit's USR2 handler with one that only sets a flag; `train` polls it after every optimizer step, the
ranks agree (all-reduce), all save a checkpoint at the same step and `TrainingInterrupted` is raised; then
rank 0 requeues the task with `scontrol requeue` (at most `MAX_REQUEUES` times) and the task exits without
a result. submitit's own handler is not used because it requeues at once on rank 0 while other ranks are
mid-step. SIGTERM (scancel, preemption, `scontrol requeue` from outside) also stops at the next step after a
checkpoint, without requeueing: Slurm decides what happens next. Slurm holds a requeued job for about two
minutes (its credential lifetime) before it may start again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from asbatch.launch.environment import apply_profile_env
from asbatch.launch.manifest import now
from asbatch.launch.runlog import run_log
from asbatch.launch.slurm import run
from asbatch.rundir import RunDir

MAX_REQUEUES = 20
BUSY_POLL_S = 15.0  # how often a task whose run another process trains looks whether it may take over


class StopRequest:
    """Signal handlers that only record the signal; `is_set` is what `train(should_stop=...)` polls."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self, signums: Sequence[int]) -> StopRequest:
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
        out = run(["scontrol", "show", "node", host, "-o"], timeout=30).stdout
        match = re.search(r"\bNodeAddr=(\S+)", out)
        if match:
            return match.group(1)
    return host


def export_distributed_env() -> bool:
    """In a Slurm job step with several tasks (a submitted multi-task job, or `srun -n 4 asbatch run SPEC`),
    export what torch.distributed's env:// init (and Accelerate) read: MASTER_ADDR (the step's first node),
    MASTER_PORT (20000-29999 from the job and step ids), RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE.
    Without it each of the step's processes would train alone, all racing on one run dir. A no-op where a
    launcher (torchrun) already set RANK, in a single-task step, and in a batch script outside `srun` (which
    has SLURM_NTASKS but runs one process). Returns whether it exported."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
    if "RANK" in os.environ or tasks <= 1:
        return False
    step = int(os.environ.get("SLURM_STEP_ID") or 0)
    nodes = max(1, int(os.environ.get("SLURM_STEP_NUM_NODES") or 1))
    first = _first_node(os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", ""))
    os.environ.update(MASTER_ADDR=_master_address(first),
                      MASTER_PORT=str(20000 + (int(os.environ["SLURM_JOB_ID"]) + 1009 * step) % 10000),
                      RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=str(tasks),
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"), LOCAL_WORLD_SIZE=str(tasks // nodes))
    return True


def _first_node(nodelist: str) -> str:
    """The first host of a Slurm node list ('n[1-2]' -> 'n1'), as Slurm expands it."""
    proc = run(["scontrol", "show", "hostnames", nodelist], timeout=30) if nodelist else None
    names = proc.stdout.split() if proc is not None and proc.returncode == 0 else []
    return names[0] if names else socket.gethostname()


def _task_job_id() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def count_requeue(run_dir: RunDir, step: int | None, via: str) -> int | None:
    """Add one requeue to the run's requeue record; None (and nothing written) at the limit. The limit is per
    Slurm job (a requeue keeps the job id), so `asbatch retry`, a new job, starts with a fresh allowance."""
    record = run_dir.read_requeues()
    job = _task_job_id()
    if sum(event.get("array_task") == job for event in record["events"]) >= MAX_REQUEUES:
        return None
    record["count"] += 1
    record["events"].append({"job_id": os.environ.get("SLURM_JOB_ID"), "array_task": job, "step": step,
                             "via": via, "at": now()})
    run_dir.write_requeues(record)
    return record["count"]


def _requeue_self(run_dir: RunDir, step: int) -> str:
    """rank 0 after every rank saved: count, then `scontrol requeue` this task. Returns what was done."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return "not under Slurm: not requeued; submit again to resume"
    count = count_requeue(run_dir, step, "scontrol requeue")
    if count is None:
        return f"requeued {MAX_REQUEUES} times already: not requeued; `asbatch retry` resumes it"
    proc = run(["scontrol", "requeue", job])
    if proc.returncode != 0:
        return f"`scontrol requeue {job}` failed: {(proc.stderr or proc.stdout).strip()}"
    return f"requeued job {job} ({count}/{MAX_REQUEUES})"


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

    def __init__(self, config: dict[str, Any], run_dir: str | Path, env: dict[str, str] | None = None,
                 upstream: list[str] | None = None, label: str | None = None):
        self.config = config
        self.run_dir = str(run_dir)
        self.env = dict(env or {})  # only given where no job script exports it (local / debug)
        self.label = label          # the run's grid point, for its progress lines
        self.upstream = list(upstream or [])  # run dirs of the runs this one runs after

    def __call__(self) -> dict[str, Any]:
        unfinished = [Path(u).name for u in self.upstream if not RunDir(u).is_finished()]
        if unfinished:  # Slurm drops a dependency on an array task cancelled before it started
            message = (f"upstream run {', '.join(unfinished)} has not finished, yet this run was started (its "
                       "upstream task was cancelled before it ran?); `asbatch retry` resubmits both")
            RunDir(self.run_dir).write_failure(f"RuntimeError: {message}")
            raise RuntimeError(message)
        stop = StopRequest().install([signal.SIGUSR2, signal.SIGTERM])
        apply_profile_env(self.env)
        export_distributed_env()
        from asbatch.config import RunConfig
        from asbatch.train import TrainingInterrupted

        config = RunConfig.model_validate(self.config)
        in_job = os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local")
        try:
            return self._train_when_free(config, stop)
        except TrainingInterrupted as err:
            name = signal.Signals(stop.signum).name if stop.signum else "a stop request"
            warned = stop.signum == signal.SIGUSR2
            if warned and _rank() == 0:
                done = _requeue_self(RunDir(self.run_dir), err.step)
            elif warned:
                done = "rank 0 requeues the task"
            else:
                done = "not requeued by the task (Slurm ends or requeues it)"
            print(f"[asbatch] {config.run_id}: {name} -> checkpoint at step {err.step}; {done}", flush=True)
            if warned and _rank() == 0 and not done.startswith("requeued job") and os.environ.get("SLURM_JOB_ID"):
                # the job ends without a requeue: `asbatch status` must say why, not "failed before it could say"
                RunDir(self.run_dir).write_failure(f"NotRequeued: stopped at step {err.step} ({name}); {done}")
            if warned and (_rank() != 0 or done.startswith("requeued job")):
                stop.wait_for_term(60)  # let the requeue end the step: no rank should look failed first
            # SystemExit is not an Exception: submitit writes no result, the job is not done
            raise SystemExit(f"[asbatch] {config.run_id} stopped at step {err.step} ({name}); {done}") from None
        finally:
            stop.uninstall(in_job)

    def _train_when_free(self, config, stop: StopRequest) -> dict[str, Any]:
        """Train; while another process trains this run (a job a killed `submit` left behind, an `asbatch run`),
        wait as its standby (the job stays RUNNING, so status and retry see it) and take over when it ends: it
        either finished the run (its results are returned) or stopped (this task resumes from its checkpoint)."""
        from asbatch.train import train
        from asbatch.train.run import RunBusyError

        said = False
        while True:
            try:
                return train(config, self.run_dir, should_stop=stop.is_set, label=getattr(self, "label", None))
            except RunBusyError as err:
                if stop.is_set():
                    raise SystemExit(f"[asbatch] {config.run_id}: stopped while waiting; {err}") from None
                if not said:
                    print(f"[asbatch] {config.run_id}: another process is training this run ({err.holder}); this task "
                          "waits and takes over when it ends", flush=True)
                    said = True
                time.sleep(BUSY_POLL_S)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        if count_requeue(RunDir(self.run_dir), None, "submitit checkpoint()") is None:
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
            missing = [u for u in upstream if not RunDir(u).is_finished()]
            if missing:
                outcome[name] = f"not run: upstream {', '.join(Path(m).name for m in missing)} did not finish"
                continue
            with run_log(RunDir(task.run_dir)):  # each run's output in its own dir too (`asbatch logs`)
                try:
                    task()
                    outcome[name] = "COMPLETED"
                except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
                    traceback.print_exc()
                    outcome[name] = f"FAILED: {type(err).__name__}: {err}"
        print(json.dumps(outcome, indent=1), flush=True)
        failed = {k: v for k, v in outcome.items() if v != "COMPLETED"}
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(outcome)} runs did not finish: {failed}")
        return outcome

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)

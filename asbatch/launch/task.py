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

import atexit
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from asbatch.launch.environment import apply_profile_env, profile_threads
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


def release_process_group() -> None:
    """Several ranks: tear the process group down while the interpreter is alive. Left to the interpreter's
    exit, gloo's threads now and then abort the process ("terminate called without an active exception",
    SIGABRT) after a finished or failed run. Every rank gets here after its last collective."""
    dist = sys.modules.get("torch.distributed")  # never imported: nothing to release
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def several_ranks() -> bool:
    """Is this process one rank of a multi-process run whose process group was started?"""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "torch.distributed" in sys.modules


def _leave_if_done() -> None:
    """atexit, registered by a multi-rank task that returned its result: skip the interpreter's teardown
    (asbatch.train.run.leave_now) unless the process ends with an uncaught exception (submitit could not save
    the result)."""
    if getattr(sys, "last_exc", None) is None and getattr(sys, "last_value", None) is None:
        from asbatch.train.run import leave_now

        leave_now(0)


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


def _requeue_self(stopped: Sequence[tuple[RunDir, int | None]]) -> str:
    """rank 0 after every rank (and every packed run) saved: count a requeue for each stopped run, then
    `scontrol requeue` this task once. Returns what was done."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return "not under Slurm: not requeued; submit again to resume"
    counts = [count_requeue(run_dir, step, "scontrol requeue") for run_dir, step in stopped]
    if None in counts:
        return f"requeued {MAX_REQUEUES} times already: not requeued; `asbatch retry` resumes it"
    proc = run(["scontrol", "requeue", job])
    if proc.returncode != 0:
        return f"`scontrol requeue {job}` failed: {(proc.stderr or proc.stdout).strip()}"
    return f"requeued job {job} ({max(counts)}/{MAX_REQUEUES})"


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
        self.own_log = False        # tee its output into its run dir (several runs share the job's log)
        self.wait_if_busy = True    # another process trains the run: wait as its standby (False: fail)

    @property
    def run_id(self) -> str:
        return Path(self.run_dir).name

    def train(self, stop: StopRequest) -> dict[str, Any]:
        """Train the run (in this process, with the environment already set), stopping when `stop` is set."""
        unfinished = [Path(u).name for u in self.upstream if not RunDir(u).is_finished()]
        if unfinished:  # Slurm drops a dependency on an array task cancelled before it started
            message = (f"upstream run {', '.join(unfinished)} has not finished, yet this run was started (its "
                       "upstream task was cancelled before it ran?); `asbatch retry` resubmits both")
            RunDir(self.run_dir).write_failure(f"RuntimeError: {message}")
            raise RuntimeError(message)
        from asbatch.config import RunConfig
        from asbatch.train import train

        config = RunConfig.model_validate(self.config)
        if getattr(self, "wait_if_busy", True):
            return self._train_when_free(config, stop)
        return train(config, self.run_dir, should_stop=stop.is_set, label=self.label)

    def __call__(self) -> dict[str, Any]:
        stop = StopRequest().install([signal.SIGUSR2, signal.SIGTERM])
        apply_profile_env(self.env)
        export_distributed_env()
        from asbatch.train import TrainingInterrupted

        in_job = os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local")
        try:
            result = self.train(stop)
            if several_ranks():
                atexit.register(_leave_if_done)  # runs after submitit has saved the result
            return result
        except TrainingInterrupted as err:
            name = signal.Signals(stop.signum).name if stop.signum else "a stop request"
            warned = stop.signum == signal.SIGUSR2
            if warned and _rank() == 0:
                done = _requeue_self([(RunDir(self.run_dir), err.step)])
            elif warned:
                done = "rank 0 requeues the task"
            else:
                done = "not requeued by the task (Slurm ends or requeues it)"
            print(f"[asbatch] {self.run_id}: {name} -> checkpoint at step {err.step}; {done}", flush=True)
            if warned and _rank() == 0 and not done.startswith("requeued job") and os.environ.get("SLURM_JOB_ID"):
                # the job ends without a requeue: `asbatch status` must say why, not "failed before it could say"
                RunDir(self.run_dir).write_failure(f"NotRequeued: stopped at step {err.step} ({name}); {done}")
            if warned and (_rank() != 0 or done.startswith("requeued job")):
                stop.wait_for_term(60)  # let the requeue end the step: no rank should look failed first
            # SystemExit is not an Exception: submitit writes no result, the job is not done
            raise SystemExit(f"[asbatch] {self.run_id} stopped at step {err.step} ({name}); {done}") from None
        finally:
            release_process_group()
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
    """The local and debug executors' callable: train the runs in stage order, up to `jobs` at once.

    `jobs` 1 (the debug executor) trains them one after another in this process; more train in worker
    processes (`asbatch.launch.pack`), each with its share of the CPUs. A run whose upstream run did not
    finish is not started (Slurm's `afterok`). Raises at the end when any run failed, so the job's result says
    so; finished runs stay finished. SIGTERM (`asbatch cancel`) checkpoints every active run.
    """

    def __init__(self, items: list[tuple[TrainTask, list[str]]], jobs: int = 1, threads: int | None = None):
        self.items = items  # (task, run dirs of its upstream runs)
        self.jobs, self.threads = jobs, threads

    def __call__(self) -> dict[str, str]:
        outcome = self._in_workers() if getattr(self, "jobs", 1) > 1 else self._in_process()
        print(json.dumps(outcome, indent=1), flush=True)
        failed = {k: v for k, v in outcome.items() if v != "COMPLETED"}
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(outcome)} runs did not finish: {failed}")
        return outcome

    def _in_process(self) -> dict[str, str]:
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
        return outcome

    def _in_workers(self) -> dict[str, str]:
        from asbatch.launch.pack import NOT_RUN, PackStop, cpu_slots, train_packed

        tasks = []
        for task, upstream in self.items:
            task.upstream, task.own_log = list(upstream), True
            tasks.append(task)
        stop = StopRequest().install([signal.SIGTERM, signal.SIGINT])
        try:
            outcomes = train_packed(tasks, cpu_slots(self.jobs, self.threads),
                                    PackStop(stop.is_set, lambda: stop.signum), env=tasks[0].env if tasks else {})
        finally:
            stop.uninstall(in_job=False)
        return {o.run_id: o.state if o.state == "COMPLETED" else
                f"{'not run' if o.state == NOT_RUN else o.state}: {o.detail}" for o in outcomes}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)


class PackTask:
    """The callable of an array task that trains several runs at once (`resources.runs_per_task`): one
    worker process per run, the task's CPUs split between them, its one GPU shared (or one GPU each).

    Each run keeps its own run dir, checkpoints, W&B id and failure record, and its output is teed into its
    run dir (`asbatch logs RUN`). A run that fails does not stop its pack-mates, and the task ends well once
    every run ended: a run downstream of a failed one finds its upstream unfinished and says so. USR2 (the
    time-limit warning) and SIGTERM are forwarded to every worker; each checkpoints its run, then the task
    requeues once (on USR2), as a single run's task does.
    """

    def __init__(self, tasks: list[TrainTask], gpus: int = 0, mps: bool = False):
        self.tasks, self.gpus, self.mps = tasks, gpus, mps
        for task in tasks:
            task.own_log = True

    def slots(self) -> list:
        """A slot per run, each bound to its share of the task's CPUs (they are the task's own), with one GPU
        each where the task has one per run (else all share the task's GPU)."""
        from asbatch.launch.pack import cpu_slots

        slots = cpu_slots(len(self.tasks), profile_threads(os.environ), pin=True)  # the job script's env wins
        visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
        if self.gpus > 1 and len(visible) >= len(slots):
            slots = [dataclasses.replace(slot, gpu=gpu) for slot, gpu in zip(slots, visible[:len(slots)], strict=True)]
        return slots

    def __call__(self) -> dict[str, str]:
        from asbatch.launch.mps import mps_daemon
        from asbatch.launch.pack import INTERRUPTED, PackStop, train_packed

        stop = StopRequest().install([signal.SIGUSR2, signal.SIGTERM])
        in_job = os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local")
        try:
            with mps_daemon() if self.mps else contextlib.nullcontext():
                outcomes = train_packed(self.tasks, self.slots(), PackStop(stop.is_set, lambda: stop.signum))
        finally:
            stop.uninstall(in_job)
        summary = {o.run_id: o.state + (f": {o.detail}" if o.detail else "") for o in outcomes}
        print(json.dumps(summary, indent=1), flush=True)
        stopped = [(RunDir(t.run_dir), o.step) for t, o in zip(self.tasks, outcomes, strict=True)
                   if o.state == INTERRUPTED]
        if not stopped:
            return summary
        name = signal.Signals(stop.signum).name if stop.signum else "a stop request"
        warned = stop.signum == signal.SIGUSR2
        done = _requeue_self(stopped) if warned else "not requeued by the task (Slurm ends or requeues it)"
        print(f"[asbatch] {len(stopped)} packed runs: {name} -> checkpoints; {done}", flush=True)
        if warned and not done.startswith("requeued job") and os.environ.get("SLURM_JOB_ID"):
            for run_dir, step in stopped:
                run_dir.write_failure(f"NotRequeued: stopped at step {step} ({name}); {done}")
        if warned and done.startswith("requeued job"):
            stop.wait_for_term(60)
        raise SystemExit(f"[asbatch] {len(stopped)} packed runs stopped ({name}); {done}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        counts = [count_requeue(RunDir(t.run_dir), None, "submitit checkpoint()") for t in self.tasks]
        return None if None in counts else submitit.helpers.DelayedSubmission(self)

    def __repr__(self) -> str:
        return f"PackTask({', '.join(t.run_id for t in self.tasks)})"

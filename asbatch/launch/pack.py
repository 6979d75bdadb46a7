"""Several runs at once on one machine: each slot is a worker process with its share of the CPUs and GPUs.

    outcomes = train_packed(tasks, slots, stop)   # `asbatch run --jobs K`, the local executor, a packed array task

A slot's worker is a fresh interpreter (spawn: no forked torch threads) that trains the runs it is handed one
after another, with the slot's CPU affinity, thread count and `CUDA_VISIBLE_DEVICES`. A run starts once the
runs it depends on (its upstream run dirs) have finished; a run whose upstream failed is not run. A failing
run does not stop its pack-mates: its worker reports the error (the run dir records it, as always) and goes
on. A stop (a signal) is forwarded to every worker, each checkpoints its run at the next step, and no new run
starts. A worker whose parent dies gets SIGTERM (it checkpoints and ends), so no orphan keeps a run's lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from asbatch.launch.environment import THREADS_ENV, apply_profile_env, profile_threads
from asbatch.rundir import RunDir

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)
COMPLETED, FAILED, INTERRUPTED, NOT_RUN = "COMPLETED", "FAILED", "INTERRUPTED", "NOT RUN"


@dataclass(frozen=True)
class Slot:
    """Where one worker trains: its CPUs (affinity; None: all this process has), its threads (None: the
    profile's or torch's default) and its GPU (`CUDA_VISIBLE_DEVICES`; None: unchanged)."""

    cpus: tuple[int, ...] | None = None
    threads: int | None = None
    gpu: str | None = None

    def describe(self) -> str:
        parts = [f"CPUs {_ranges(self.cpus)}"] if self.cpus else []
        parts += [f"{self.threads} thread{'s' if self.threads != 1 else ''}"] if self.threads else []
        parts += [f"GPU {self.gpu}"] if self.gpu is not None else []
        return ", ".join(parts) or "all CPUs"


@dataclass
class Outcome:
    """How one run of a pack ended: COMPLETED (with its results), FAILED (with the error), INTERRUPTED (a
    checkpoint at `where`) or NOT RUN (why)."""

    run_id: str
    state: str
    results: dict[str, Any] | None = None
    detail: str = ""
    step: int | None = None


def _ranges(cpus: Sequence[int]) -> str:
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        start = cpu if start is None else start
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: a Slurm task's own, a `taskset`); every CPU where the
    OS has no affinity call (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def split_cpus(jobs: int, cpus: Sequence[int] | None = None) -> list[tuple[int, ...] | None]:
    """This process's CPUs in `jobs` contiguous shares (the first ones get the remainder); None for every
    share when there are fewer CPUs than jobs (they share all of them)."""
    cpus = sorted(cpus if cpus is not None else usable_cpus())
    if jobs < 1 or len(cpus) < jobs:
        return [None] * max(jobs, 0)
    base, extra = divmod(len(cpus), jobs)
    out, start = [], 0
    for i in range(jobs):
        size = base + (i < extra)
        out.append(tuple(cpus[start:start + size]))
        start += size
    return out


def cpu_slots(jobs: int, threads: int | None, pin: bool = False) -> list[Slot]:
    """`jobs` slots over this process's CPUs, each with `threads` threads (None: its share of the CPUs).
    `pin`: each bound to its share (a Slurm task's CPUs are its own; on a shared machine the OS places
    the workers better than a fixed binding, which other programs' load would slow down)."""
    return [Slot(cpus=share if pin else None, threads=threads or (len(share) if share else None))
            for share in split_cpus(jobs)]


def gpu_slots(gpus: Sequence[str], runs_per_gpu: int, threads: int | None) -> list[Slot]:
    """`runs_per_gpu` slots per GPU, the threads of this process's CPUs split between all of them."""
    shares = split_cpus(len(gpus) * runs_per_gpu)
    return [Slot(threads=threads or (len(share) if share else None), gpu=gpus[i // runs_per_gpu])
            for i, share in enumerate(shares)]


def default_cpu_jobs(threads_per_run: int | None) -> int:
    """Runs that fill this machine's CPUs (the ones this process may use) at `threads_per_run` threads each."""
    cores = len(usable_cpus())
    return max(1, cores // max(1, threads_per_run or cores))


# ------------------------------------------------------------------------------------------ the worker

def _die_with_parent() -> None:
    """Linux: SIGTERM when the parent dies (a kill -9 of `asbatch run`): the run checkpoints and ends."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _detach_output() -> None:
    """SIGHUP: the terminal is gone; writing to it must not fail the checkpoint that follows."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def _worker(slot: Slot, env: dict[str, str], plain: bool, conn: Connection, ignored: tuple[int, ...] = (),
            bars: Any = None) -> None:
    """A slot's process: set the slot's environment before torch is imported, then train what comes. It
    starts with the stop signals blocked (see `_start`) and unblocks them once its handlers are in place."""
    from asbatch.launch.task import StopRequest

    stop = StopRequest().install([s for s in STOP_SIGNALS if s not in ignored])  # a flag: the parent decides
    if signal.SIGHUP not in ignored:
        signal.signal(signal.SIGHUP, lambda signum, frame: (_detach_output(), stop._handle(signum, frame)))
    for signum in ignored:  # what the command was started to ignore (nohup) the workers ignore too
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _die_with_parent()
    if slot.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, slot.cpus)
    if slot.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu
    if slot.threads and THREADS_ENV not in env:
        os.environ[THREADS_ENV] = str(slot.threads)
    apply_profile_env(env)  # the profile's variables win, as in a job script
    from asbatch.train.progress import PROGRESS_ENV, set_bar_sink  # imports torch: after the environment

    if plain:
        os.environ[PROGRESS_ENV] = "lines"  # several runs share the terminal: lines, never a bar
    if bars is not None:  # a terminal: the parent draws every run's bar
        set_bar_sink(bars)
    while (task := conn.recv()) is not None:
        conn.send(_train_one(task, stop))
    conn.close()


def _train_one(task: Any, stop: Any) -> tuple:
    from asbatch.launch.runlog import run_log
    from asbatch.train import TrainingInterrupted

    with run_log(RunDir(task.run_dir)) if task.own_log else contextlib.nullcontext():
        try:
            return COMPLETED, task.train(stop)
        except TrainingInterrupted as err:
            return INTERRUPTED, err.where, err.step
        except Exception as err:  # noqa: BLE001 - one failed run must not stop its pack-mates
            traceback.print_exc()
            return FAILED, f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------------------ the parent

@dataclass
class _Worker:
    slot: Slot
    process: Any
    conn: Connection
    task: Any = None  # what it trains now


@dataclass
class PackStop:
    """What the parent polls (`is_set`) and which signal it forwards (`signum`); `kill_workers` is what a
    second signal calls before it ends the parent at once."""

    is_set: Callable[[], bool]
    signum: Callable[[], int | None]
    workers: list[int] = field(default_factory=list)

    def kill_workers(self) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def train_packed(tasks: Sequence[Any], slots: Sequence[Slot], stop: PackStop, env: dict[str, str] | None = None,
                 on_end: Callable[[Outcome], None] | None = None, bars: Any = None) -> list[Outcome]:
    """Train `tasks` (TrainTask-like: `run_id`, `run_dir`, `upstream` run dirs, `own_log`, `train(stop)`) in
    up to len(slots) worker processes. Returns one Outcome per task, in the tasks' order; `on_end` is called
    as each run ends. Progress is lines, or with `bars` (a spawn-context queue) bar events for the parent."""
    ctx = multiprocessing.get_context("spawn")
    pending, outcomes = sorted(tasks, key=_estimated_cost, reverse=True), {}  # longest first: less idle at the end
    by_dir = {str(Path(t.run_dir)): t.run_id for t in tasks}
    idle: list[_Worker] = []
    busy: dict[Any, _Worker] = {}  # the worker's result pipe -> the worker
    free_slots = list(slots)
    forwarded = False

    def end(outcome: Outcome) -> None:
        outcomes[outcome.run_id] = outcome
        if on_end is not None:
            on_end(outcome)

    try:
        while pending or busy:
            if stop.is_set():
                for task in pending:
                    end(Outcome(task.run_id, NOT_RUN, detail="stopped before it started"))
                pending = []
                if not forwarded and stop.signum() is not None:
                    for worker in busy.values():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.process.pid, stop.signum())
                    forwarded = True
            for task in list(pending):
                why = _cannot_run(task, by_dir, outcomes)
                if why is not None:
                    pending.remove(task)
                    end(Outcome(task.run_id, NOT_RUN, detail=why))
                elif _ready(task) and (idle or free_slots):
                    worker = idle.pop() if idle else _start(ctx, free_slots.pop(0), env or {}, stop, bars)
                    worker.task = task
                    worker.conn.send(task)
                    busy[worker.conn] = worker
                    pending.remove(task)
            if pending and not busy:
                raise RuntimeError(f"runs {', '.join(t.run_id for t in pending)} wait for upstream runs that are not "
                                   "in this pack and have not finished")
            for conn in wait([*busy, *(w.process.sentinel for w in busy.values())], timeout=0.25):
                worker = busy.get(conn) or next((w for w in busy.values() if w.process.sentinel == conn), None)
                if worker is None or worker.conn not in busy:
                    continue
                del busy[worker.conn]
                end(_receive(worker, stopping=stop.is_set()))
                if worker.process.is_alive():
                    idle.append(worker)
                else:  # it died (out of memory, a signal): its slot gets a fresh worker
                    stop.workers.remove(worker.process.pid)
                    free_slots.append(worker.slot)
    finally:
        for worker in [*idle, *busy.values()]:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(None)
        # every outcome is in: the workers' exits (torch's teardown) overlap what the caller prints next;
        # one that does not exit is killed
        threading.Thread(target=_retire, args=([*idle, *busy.values()],), daemon=True).start()
    return [outcomes[t.run_id] for t in tasks]


def _retire(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.process.join(timeout=30)
        if worker.process.is_alive():
            worker.process.kill()


def _start(ctx: Any, slot: Slot, env: dict[str, str], stop: PackStop, bars: Any) -> _Worker:
    """Start a worker with the stop signals blocked: the mask survives the exec, so a Ctrl-C while it starts
    waits for its handlers instead of killing it with a traceback (the parent's own signals wait a moment)."""
    parent, child = ctx.Pipe()
    ignored = tuple(s for s in STOP_SIGNALS if signal.getsignal(s) is signal.SIG_IGN)
    process = ctx.Process(target=_worker, args=(slot, env, bars is None, child, ignored, bars), daemon=False)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    child.close()
    stop.workers.append(process.pid)
    return _Worker(slot, process, parent)


def _receive(worker: _Worker, stopping: bool) -> Outcome:
    """The run's outcome from its worker; a worker that died is a FAILED run (recorded in its run dir),
    unless it died while everything was stopping (its newest checkpoint stands)."""
    task = worker.task
    try:
        message = worker.conn.recv() if worker.conn.poll(0.5) else None
    except (EOFError, OSError):
        message = None
    if message is None:
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        if stopping:
            return Outcome(task.run_id, INTERRUPTED, detail=f"its newest checkpoint (its worker ended: {how})")
        detail = f"WorkerDied: the worker process training it ended ({how}; out of memory?)"
        with contextlib.suppress(OSError):
            RunDir(task.run_dir).write_failure(detail)
        return Outcome(task.run_id, FAILED, detail=detail)
    state, *rest = message
    if state == COMPLETED:
        return Outcome(task.run_id, COMPLETED, results=rest[0])
    if state == INTERRUPTED:
        return Outcome(task.run_id, INTERRUPTED, detail=rest[0], step=rest[1])
    return Outcome(task.run_id, FAILED, detail=rest[0])


def _estimated_cost(task: Any) -> float:
    """A run's training work, roughly (for the order runs start in, never for their numbers): epochs x
    steps per epoch x the network passes of a step (1 + N inner passes + 1 adversarial pass under AS)."""
    config = getattr(task, "config", None) or {}
    data, adversarial = config.get("data") or {}, config.get("adversarial") or {}
    steps = (data.get("train_subset") or 50_000) / max(1, data.get("batch_size") or 128)
    passes = 2 + (adversarial.get("steps") or 0) if (adversarial.get("lam") or 0) > 0 else 1
    return ((config.get("schedule") or {}).get("epochs") or 1) * steps * passes


def _ready(task: Any) -> bool:
    return all(RunDir(up).is_finished() for up in task.upstream)


def _cannot_run(task: Any, by_dir: dict[str, str], outcomes: dict[str, Outcome]) -> str | None:
    """Why `task` can never run here: an upstream run that ended in this pack without finishing, or one that
    is not in the pack and has not finished."""
    for up in task.upstream:
        if RunDir(up).is_finished():
            continue
        name = by_dir.get(str(Path(up)))
        if name is None or (name in outcomes and outcomes[name].state != COMPLETED):
            return f"upstream {name or Path(up).name} did not finish"
    return None


def packs(items: Sequence[Any], size: int) -> list[list[Any]]:
    """`items` in consecutive groups of `size` (the last may be smaller): the runs of each array task."""
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))] if items else []


def task_count(runs: int, size: int) -> int:
    """How many groups of `size` hold `runs` (array tasks of packed runs, arrays of MaxArraySize tasks)."""
    return math.ceil(runs / max(1, size))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them (imports torch)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def local_jobs(env: dict[str, str], runs: int, jobs: int | None = None) -> tuple[int, int | None]:
    """The local executor's runs at once (`jobs`, else CPU cores / the profile's threads per run; at most
    `runs`) and the threads per run (None: not set by the profile)."""
    per_run = profile_threads(env)
    return max(1, min(runs, jobs or default_cpu_jobs(per_run))), per_run


def local_slots(env: dict[str, str], runs: int, jobs: int | None, gpus: Sequence[str], runs_per_gpu: int) -> list[Slot]:
    """`asbatch run`'s slots: `jobs` of them (default: fill the machine: one run per GPU times `runs_per_gpu`
    where the runs use GPUs, else CPU cores / the profile's threads per run), at most one per run. On GPUs
    the slots are spread over them."""
    if not gpus:
        return cpu_slots(*local_jobs(env, runs, jobs))
    count = max(1, min(runs, jobs or len(gpus) * runs_per_gpu))
    return gpu_slots(gpus, task_count(count, len(gpus)), profile_threads(env))[:count]

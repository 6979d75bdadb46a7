"""`train(config, run_dir) -> results`: one run, start to finish, resuming from its newest checkpoint."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from asbatch.config import RunConfig
from asbatch.fsutil import append_line, atomic_write_bytes
from asbatch.names import count
from asbatch.rundir import RunDir
from asbatch.tracking import Tracker, close_wandb_quietly, complete_tracking
from asbatch.train.progress import RunFacts, RunReport
from asbatch.train.trainer import Progress, Trainer, TrainingInterrupted


class MetricsLog:
    """The run's per-epoch metrics file; on resume the lines of epochs to be re-run are dropped."""

    def __init__(self, run_dir: RunDir, resume_epoch: int):
        self.path = run_dir.metrics_file
        if self.path.exists():
            keep = [json.dumps(row, sort_keys=True) for row in run_dir.read_metrics() if row["epoch"] < resume_epoch]
            atomic_write_bytes(self.path, lambda f: f.write("".join(k + "\n" for k in keep).encode()))

    def append(self, row: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(row, sort_keys=True))  # whole or not at all (a full disk)


def train(
    config: RunConfig,
    run_dir: str | Path | RunDir,
    should_stop: Callable[[], bool] | None = None,
    label: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the results dict also written to the run dir.

    `should_stop` (e.g. "a USR2 arrived") is polled after every optimizer step, after every epoch and during
    the final evaluation; the ranks agree on it (an all-reduce), all save a checkpoint at that same step (or
    keep the epoch-end one), and `TrainingInterrupted` is raised (its `where` says where, for people). The
    results are written last, after W&B finished the run; a finished run is not trained again, but W&B is
    completed if it was not. Rank 0 reports progress (`asbatch.train.progress`; `label`: the run's grid point,
    e.g. `lam=0.8 seed=1`) unless `quiet`.
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    report = RunReport(run_dir.run_id, label, config.schedule.epochs, enabled=rank == 0 and not quiet)
    if run_dir.is_finished():
        return _finished_before(config, run_dir, report, rank == 0)
    with run_dir.training(rank) as mine:
        if not mine:  # two trainers in one run dir would both write its checkpoints and metrics
            raise RunBusyError(run_dir, _holder(run_dir))
        if run_dir.is_finished():  # it finished while we looked
            return _finished_before(config, run_dir, report, rank == 0)
        return _train_locked(config, run_dir, report, should_stop, rank == 0)


class RunBusyError(RuntimeError):
    """Another live process trains this run dir."""

    def __init__(self, run_dir: RunDir, holder: str) -> None:
        super().__init__(f"{run_dir.path}: another process is training this run ({holder}); wait for it to end "
                         "or stop it, then run the same command again to resume")
        self.holder = holder


def _holder(run_dir: RunDir) -> str:
    record = run_dir.read_process()
    if not record:
        return "its process record is not written yet"
    return f"pid {record.get('pid')} on {record.get('host')} since {record.get('started_at')}"


def _finished_before(config: RunConfig, run_dir: RunDir, report: RunReport, main: bool) -> dict[str, Any]:
    """A finished run is never trained again; its W&B run is completed if it was not."""
    results = run_dir.read_results()
    if main:
        complete_tracking(config, run_dir, results)
    report.finished_before(results)
    return results


def _train_locked(config: RunConfig, run_dir: RunDir, report: RunReport, should_stop: Callable[[], bool] | None,
                  main: bool) -> dict[str, Any]:
    if main:
        run_dir.clear_failure()
        run_dir.write_process({"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(),
                               "create_time": psutil.Process().create_time()})  # tells a reused pid apart
    try:
        return _train(config, run_dir, report, should_stop)
    except TrainingInterrupted:
        raise
    except Exception as err:
        if main:  # for `asbatch status`: why this attempt failed
            try:
                run_dir.write_failure(f"{type(err).__name__}: {err}")
            except OSError as write_err:  # a full disk may refuse this too: the run's own error is the one to see
                warnings.warn(f"could not record the failure for `asbatch status`: {write_err}", stacklevel=2)
        raise
    finally:
        report.close()
        if main:
            run_dir.clear_process()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def where_stopped(prog: Progress, epochs: int, steps_per_epoch: int) -> str:
    """Where an interrupted run stopped, as people count (epochs and steps from 1)."""
    if prog.global_step == 0:
        return "the start (no step was taken)"
    if prog.epoch >= epochs:
        return f"the final evaluation (all {epochs} epochs are done)"
    if prog.step_in_epoch == 0:
        return f"epoch {prog.epoch} step {steps_per_epoch} (the end of epoch {prog.epoch}/{epochs})"
    size = f"{count(epochs, 'epoch')} x {count(steps_per_epoch, 'step')}"
    return f"epoch {prog.epoch + 1} step {prog.step_in_epoch} (of {size})"


def _facts(trainer: Trainer) -> RunFacts:
    import torch

    prog = trainer.prog
    return RunFacts(parameters=sum(p.numel() for p in trainer.inner.parameters() if p.requires_grad),
                    model=("Bayesian " if trainer.config.model.bayesian else "") + trainer.config.model.name,
                    device=str(trainer.device), precision=trainer.precision_ran, world_size=trainer.world,
                    threads=torch.get_num_threads() if trainer.device.type == "cpu" else None,
                    steps_per_epoch=trainer.steps_per_epoch, epoch=prog.epoch, step_in_epoch=prog.step_in_epoch,
                    global_step=prog.global_step)


def _train(config: RunConfig, run_dir: RunDir, report: RunReport, should_stop: Callable[[], bool] | None,
           ) -> dict[str, Any]:
    wall_start = time.time()
    trainer = Trainer(config, run_dir)
    trainer.resume()
    prog, main = trainer.prog, trainer.is_main
    metrics = MetricsLog(run_dir, prog.epoch) if main else None
    report.started(_facts(trainer))
    try:
        # the W&B run is closed (as failed) if anything below raises, so a requeued segment can continue it
        with Tracker(config, run_dir, enabled=main) as tracker:
            tracker.catch_up(run_dir.read_metrics() if main else [])  # what W&B lost of earlier segments
            while trainer.prog.epoch < config.schedule.epochs:
                row = trainer.epoch_metrics(*trainer.run_epoch(should_stop, report))
                if row is not None:
                    metrics.append(row)
                    tracker.log_epoch(row, step=row["global_step"])
                    report.epoch(row, trainer.prog.train_time_s, trainer.steps_per_epoch)
                trainer.finish_epoch()
                trainer.stop_if_asked(should_stop)
            samples = config.eval.num_samples if config.model.bayesian else 1
            total = samples * len(trainer.test_loader) if config.eval.ood is None else None
            results = trainer.results(wall_start, report.evaluation(samples, total, should_stop))
            if main:
                tracker.complete(results)
                run_dir.write_results(results)
    except TrainingInterrupted as err:
        err.where = where_stopped(trainer.prog, config.schedule.epochs, trainer.steps_per_epoch)
        close_wandb_quietly()  # the stop signal reached W&B's service too: no traceback from wandb's exit hook
        raise
    trainer.accelerator.wait_for_everyone()
    report.done(results)
    return results if main else run_dir.read_results()


def leave_now(code: int) -> None:
    """End the process with `code` without the interpreter's teardown, its output flushed and W&B torn down:
    in a rank of a multi-process run gloo's threads now and then abort the process there, after its work is
    done ("terminate called without an active exception", SIGABRT: exit -6 instead of `code`), even after
    the process group was destroyed (asbatch.launch.task.release_process_group)."""
    close_wandb_quietly()  # what W&B's exit hook would do: its service writes the rest of the run
    logging.shutdown()  # submitit's log lines
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""`train(config, run_dir) -> results`: one run, start to finish, resuming from its newest checkpoint."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asbatch.config import RunConfig
from asbatch.fsutil import atomic_write_bytes
from asbatch.rundir import RunDir
from asbatch.tracking import Tracker, complete_tracking
from asbatch.train.trainer import Trainer, TrainingInterrupted


class MetricsLog:
    """The run's per-epoch metrics file; on resume the lines of epochs to be re-run are dropped."""

    def __init__(self, run_dir: RunDir, resume_epoch: int):
        self.path = run_dir.metrics_file
        if self.path.exists():
            keep = [json.dumps(row, sort_keys=True) for row in run_dir.read_metrics() if row["epoch"] < resume_epoch]
            atomic_write_bytes(self.path, lambda f: f.write("".join(k + "\n" for k in keep).encode()))

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def train(
    config: RunConfig,
    run_dir: str | Path | RunDir,
    progress_bar: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the results dict also written to the run dir.

    `should_stop` (e.g. "a USR2 arrived") is polled after every optimizer step, after every epoch and during
    the final evaluation; the ranks agree on it (an all-reduce), all save a checkpoint at that same step (or
    keep the epoch-end one), and `TrainingInterrupted` is raised. The results are written last, after W&B
    finished the run; a finished run is not trained again, but W&B is completed if it was not.
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    main = int(os.environ.get("RANK", "0")) == 0
    if run_dir.is_finished():  # finished: never re-run
        results = run_dir.read_results()
        if main:
            complete_tracking(config, run_dir, results)
        return results
    if main:
        run_dir.clear_failure()
    try:
        return _train(config, run_dir, progress_bar, should_stop)
    except TrainingInterrupted:
        raise
    except Exception as err:
        if main:  # for `asbatch status`: why this attempt failed
            run_dir.write_failure(f"{type(err).__name__}: {err}")
        raise


def _train(config: RunConfig, run_dir: RunDir, progress_bar: bool, should_stop: Callable[[], bool] | None,
           ) -> dict[str, Any]:
    wall_start = time.time()
    trainer = Trainer(config, run_dir)
    trainer.resume()
    prog, main = trainer.prog, trainer.is_main
    metrics = MetricsLog(run_dir, prog.epoch) if main else None
    bar = None
    if progress_bar and main:
        from tqdm import tqdm

        bar = tqdm(total=config.schedule.epochs * trainer.steps_per_epoch, initial=prog.global_step,
                   desc=run_dir.run_id, unit="step", leave=False, disable=None)  # no bar off a terminal
    # the W&B run is closed (as failed) if anything below raises, so a requeued segment can continue it
    with Tracker(config, run_dir, enabled=main) as tracker:
        tracker.catch_up(run_dir.read_metrics() if main else [])  # what W&B lost of earlier segments
        while trainer.prog.epoch < config.schedule.epochs:
            row = trainer.epoch_metrics(*trainer.run_epoch(should_stop, bar))
            if row is not None:
                metrics.append(row)
                tracker.log_epoch(row, step=row["global_step"])
            trainer.finish_epoch()
            trainer.stop_if_asked(should_stop)
        if bar is not None:
            bar.close()
        results = trainer.results(wall_start, should_stop)
        if main:
            tracker.complete(results)
            run_dir.write_results(results)
    trainer.accelerator.wait_for_everyone()
    return results if main else run_dir.read_results()

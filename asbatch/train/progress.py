"""What a training run tells the person watching it: a start line, then a bar or one line per epoch.

On a terminal (or in a notebook) each run gets a rich progress bar with its epoch, loss, train and test
accuracy, kept on screen when the run ends, and a second bar for the final S-sample evaluation. Anywhere else
(a pipe, `nohup`, a Slurm job, the local executor's log) each epoch is one flushed line with epoch/N, loss,
accuracies, images/s, elapsed and ETA, so `asbatch logs RUN` shows the training. Only rank 0 reports.

    report = RunReport(run_id, label, epochs, enabled=rank == 0)
    report.started(facts)              # the run-start line (and the bar on a terminal)
    report.update(1)                   # after every optimizer step (the trainer calls it)
    report.epoch(row, progress)        # after every epoch's metrics row
    report.evaluation(total, poll)     # wraps the evaluation's stop poll to count batches
    report.done(results)

Several runs at once on a terminal (`asbatch run --jobs K`): each worker's bar calls go as events to the
parent (`set_bar_sink`), which draws every active run's bar in one place (`asbatch.cli.packed`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asbatch.names import count, duration
from asbatch.runshape import epoch_test_acc


@dataclass
class RunFacts:
    """What the run-start line says."""

    parameters: int
    model: str
    device: str
    precision: str
    world_size: int
    threads: int | None          # torch's intra-op threads on CPU (None on a GPU)
    steps_per_epoch: int
    epoch: int = 0               # where training resumes: epoch to run next, its next step, global step
    step_in_epoch: int = 0
    global_step: int = 0


def resumed_text(facts: RunFacts, epochs: int) -> str:
    if facts.global_step == 0:
        return "fresh"
    if facts.epoch >= epochs:
        return f"resumed after all {epochs} epochs: final evaluation only"
    if facts.step_in_epoch == 0:
        return f"resumed after epoch {facts.epoch}/{epochs} (global step {facts.global_step})"
    return (f"resumed in epoch {facts.epoch + 1}/{epochs} after step {facts.step_in_epoch}/{facts.steps_per_epoch} "
            f"(global step {facts.global_step})")


def percent(value: float | None, decimals: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{decimals}f}%"




PROGRESS_ENV = "ASBATCH_PROGRESS"  # "lines": progress as lines even on a terminal
_BAR_SINK = None  # a queue to the process that draws the bars (a worker of `asbatch run --jobs K`)


def set_bar_sink(queue) -> None:
    """In a worker: send bar events to `queue` (the parent draws them) instead of drawing here."""
    global _BAR_SINK
    _BAR_SINK = queue


def is_terminal() -> bool:
    """Whether stdout is a terminal that gets bars (or the bars go to a parent that draws them);
    ASBATCH_PROGRESS=lines asks for lines even there."""
    from rich.console import Console

    if os.environ.get(PROGRESS_ENV) == "lines":
        return False
    if _BAR_SINK is not None:
        return True

    console = Console()
    return console.is_terminal or console.is_jupyter


def new_bars():
    """The rich Progress every run's bars are drawn with (one task per run, one for its evaluation)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), TextColumn("{task.fields[stats]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


class RunReport:
    """The run's progress output (see the module docstring); every method is a no-op when not `enabled`."""

    def __init__(self, run_id: str, label: str | None, epochs: int, enabled: bool = True,
                 terminal: bool | None = None):
        self.run_id, self.label, self.epochs, self.enabled = run_id, label, epochs, enabled
        self.terminal = enabled and (is_terminal() if terminal is None else terminal)
        self.name = f"{run_id} ({label})" if label and label != "-" else run_id
        self._bar = self._task = self._eval_task = None
        self._epoch_times: list[float] = []
        self._started = time.time()

    # ------------------------------------------------------------------------------------------ output
    def line(self, text: str) -> None:
        """One line on stdout, flushed (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stdout, flush=True)

    def finished_before(self, results: dict[str, Any]) -> None:
        ev = results.get("evaluation", {})
        self.line(f"{self.name}: finished earlier: ensemble {percent(ev.get('ensemble_accuracy'), 2)} (not trained "
                  "again)")

    def started(self, facts: RunFacts) -> None:
        if not self.enabled:
            return
        threads = f", {facts.threads} thread{'s' if facts.threads != 1 else ''}" if facts.threads else ""
        self.line(f"{self.name}: {facts.model}, {facts.parameters:,} parameters | {facts.device} {facts.precision}"
                  f"{threads} | world size {facts.world_size} | {resumed_text(facts, self.epochs)} | "
                  f"{count(self.epochs, 'epoch')} x {count(facts.steps_per_epoch, 'step')}")
        if self.terminal:
            self._start_bar(facts)

    def _start_bar(self, facts: RunFacts) -> None:
        self._bar = SinkBar(_BAR_SINK, self.run_id) if _BAR_SINK is not None else new_bars()
        self._bar.start()
        self._task = self._bar.add_task(self.label if self.label and self.label != "-" else self.run_id,
                                        total=self.epochs * facts.steps_per_epoch, completed=facts.global_step,
                                        stats=f"epoch {min(facts.epoch + 1, self.epochs)}/{self.epochs}")

    # ------------------------------------------------------------------------------------------ training
    def update(self, steps: int = 1) -> None:
        """After each optimizer step (the trainer's `bar`)."""
        if self._bar is not None:
            self._bar.advance(self._task, steps)

    def epoch(self, row: dict[str, Any], train_time_s: float, steps_per_epoch: int) -> None:
        """After an epoch's metrics row: the line (or the bar's fields). `train_time_s`: training time so far,
        over every segment of the run."""
        if not self.enabled:
            return
        done = row["epoch"] + 1
        self._epoch_times.append(row["step_time_s"] * steps_per_epoch)
        eta = sum(self._epoch_times) / len(self._epoch_times) * (self.epochs - done)
        stats = (f"loss {row['train_loss']:.4f}  acc {percent(row['train_acc'])}  "
                 f"test {percent(epoch_test_acc(row))}")
        if self._bar is not None:
            self._bar.update(self._task, stats=f"epoch {done}/{self.epochs}  {stats}")
            return
        self.line(f"{self.run_id} epoch {done}/{self.epochs}  {stats}  {row['images_per_s']:,.0f} img/s  "
                  f"elapsed {duration(train_time_s)}  ETA {duration(eta)}")

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluation(self, samples: int, total: int | None,
                   should_stop: Callable[[], bool] | None) -> Callable[[], bool]:
        """The poll to hand to the final evaluation (called before every batch): it counts the batches for
        the bar and asks `should_stop`. `total`: batches over every sample (None: not known)."""
        self._eval_started = time.time()
        if self.enabled and self._bar is not None:
            self._eval_task = self._bar.add_task("final evaluation", total=total, stats=f"{samples} weight samples")
        elif self.enabled:
            batches = total // samples if total else 0
            per = f" x {batches} test batch{'es' if batches != 1 else ''}" if total else ""
            self.line(f"{self.run_id} final evaluation: {samples} weight samples{per}")

        def poll() -> bool:
            if self._eval_task is not None:
                self._bar.advance(self._eval_task, 1)
            return should_stop is not None and should_stop()

        return poll

    def done(self, results: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.close()
        ev = results["evaluation"]
        took = time.time() - getattr(self, "_eval_started", time.time())
        self.line(f"{self.run_id} done: ensemble {percent(ev['ensemble_accuracy'], 2)}  lowest "
                  f"{percent(ev['lowest_accuracy'], 2)}  highest {percent(ev['highest_accuracy'], 2)}  (train "
                  f"{duration(results['timing']['train_time_s'])}, evaluation {duration(took)})")

    def close(self) -> None:
        """Stop the bar (it stays on screen)."""
        if self._bar is not None:
            if self._eval_task is not None and self._bar.tasks[-1].total is None:
                self._bar.update(self._eval_task, total=self._bar.tasks[-1].completed)
            self._bar.stop()
            self._bar = None


@dataclass
class _SinkTask:
    total: float | None
    completed: float


class SinkBar:
    """What `RunReport` uses of rich's Progress, sent as events (run id, kind, task, data) to the process
    that draws every run's bars. Step advances are sent at most every 0.2 s (a queue put per step would be
    host work in the training loop)."""

    def __init__(self, sink, run_id: str) -> None:
        self.sink, self.run_id, self.tasks = sink, run_id, []
        self.console = self
        self._pending: dict[int, float] = {}
        self._sent = 0.0

    def _send(self, kind: str, task: int | None, data: Any) -> None:
        self.sink.put((self.run_id, kind, task, data))

    def print(self, text: Any, **_: Any) -> None:
        self._flush()
        self._send("line", None, str(text))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self._flush()
        self._send("stop", None, None)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        self.tasks.append(_SinkTask(total, completed))
        self._send("add", len(self.tasks) - 1, {"description": description, "total": total, "completed": completed,
                                               **fields})
        return len(self.tasks) - 1

    def advance(self, task: int, steps: float = 1) -> None:
        self.tasks[task].completed += steps
        self._pending[task] = self._pending.get(task, 0) + steps
        if time.monotonic() - self._sent > 0.2:
            self._flush()

    def update(self, task: int, **fields: Any) -> None:
        self._flush()
        if "total" in fields:
            self.tasks[task].total = fields["total"]
        self._send("update", task, fields)

    def _flush(self) -> None:
        for task, steps in self._pending.items():
            self._send("advance", task, steps)
        self._pending.clear()
        self._sent = time.monotonic()

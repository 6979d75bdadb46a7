"""`asbatch run --jobs K`: several runs at once, each in its own worker process, with `run`'s promises kept.

The same output as one by one: on a terminal one bar per active run (drawn here from the workers' events:
`BarBoard`), elsewhere each run's start, epoch and done lines, carrying its id. Ctrl-C / SIGTERM / SIGHUP
checkpoint every active run and exit 130 / 143 / 129, a second signal stops at once (the workers too), the
same command resumes. A run that fails does not stop the others: each failure is said as it happens, and
the command ends with one `error:` line (exit 1) after the table of the runs that finished.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import threading
from pathlib import Path

import click

from asbatch.cli.app import error_line


def run_packed(sweep, selected, runs_root: Path, slots: list, stop) -> list[dict]:
    """Train the selected stages' runs in `slots` at once; returns the finished runs' results in run order."""
    from asbatch.launch.pack import COMPLETED, FAILED, INTERRUPTED, PackStop, train_packed
    from asbatch.launch.task import TrainTask
    from asbatch.names import count, point_label

    sweep_root = runs_root / sweep.name
    runs = [run for stage in selected for run in stage.runs]
    tasks = []
    for run in runs:
        task = TrainTask(run.config.to_dict(), sweep_root / run.run_id, label=point_label(run.point),
                         upstream=[str(sweep_root / up) for up in run.upstream.values()])
        task.wait_if_busy = False  # as one by one: a run another process trains is an error, said at once
        tasks.append(task)
    shares = list(dict.fromkeys(s.describe() for s in slots))
    each = f"{shares[0]} each" if len(shares) == 1 else "; ".join(s.describe() for s in slots)
    click.echo(f"{count(len(slots), 'run')} at once, each in its own process ({each}); --jobs 1 trains them one by "
               "one in this process")
    pack_stop = PackStop(stop.is_set, lambda: stop.first if stop.is_set() else None)
    stop.on_force.append(pack_stop.kill_workers)

    def said(outcome) -> None:
        if outcome.state == FAILED:
            click.echo(f"{outcome.run_id} failed: {outcome.detail}", err=True)
        elif outcome.state != COMPLETED and outcome.state != INTERRUPTED:
            click.echo(f"{outcome.run_id} not run: {outcome.detail}", err=True)

    from asbatch.train.progress import is_terminal

    with BarBoard() if is_terminal() else contextlib.nullcontext() as board:  # one bar per active run
        outcomes = train_packed(tasks, slots, pack_stop, env=sweep.env, on_end=said,
                                bars=board.queue if board is not None else None)
    stopped = [o for o in outcomes if o.state == INTERRUPTED]
    if stopped or stop.is_set():
        for outcome in stopped:
            click.echo(f"{outcome.run_id} {stop.what} at {outcome.detail}; checkpoint saved", err=True)
        click.echo(f"{sweep.name}: {stop.what}; run the same command to resume", err=True)
        sys.exit(stop.exit_code)
    failed = [o for o in outcomes if o.state != COMPLETED]
    results = [o.results for o in outcomes if o.state == COMPLETED]
    if failed:
        from asbatch.cli.run import _print_table

        _print_table(sweep.name, results, runs_root)
        first = failed[0]
        more = f" (and {count(len(failed) - 1, 'more run')}, said above)" if len(failed) > 1 else ""
        error_line(f"{count(len(failed), 'run')} of {len(outcomes)} did not finish: {first.run_id}: {first.detail}"
                   f"{more}", 1)
    return results


class BarBoard:
    """On a terminal: every active run's bar (and its evaluation's), drawn here from its worker's events
    (`asbatch.train.progress.SinkBar`); the runs' lines print above the bars, which stay on screen."""

    def __init__(self) -> None:
        from asbatch.train.progress import new_bars

        self.queue = multiprocessing.get_context("spawn").Queue()
        self.bars = new_bars()
        self._tasks: dict[tuple[str, int], int] = {}  # (run id, its task) -> the bar's task id
        self._thread = threading.Thread(target=self._draw, daemon=True)

    def __enter__(self) -> BarBoard:
        self.bars.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)
        self.bars.stop()

    def _draw(self) -> None:
        while (event := self.queue.get()) is not None:
            run_id, kind, task, data = event
            if kind == "line":
                self.bars.console.print(data, markup=False, highlight=False, soft_wrap=True)
            elif kind == "add":
                self._tasks[(run_id, task)] = self.bars.add_task(data.pop("description"), **data)
            elif kind == "advance" and (run_id, task) in self._tasks:
                self.bars.advance(self._tasks[(run_id, task)], data)
            elif kind == "update" and (run_id, task) in self._tasks:
                self.bars.update(self._tasks[(run_id, task)], **data)

"""What every command shares: the runs-root option, loading a spec, finding a sweep, printing errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


def runs_root_option(f):
    return click.option("--runs-root", type=click.Path(file_okay=False, path_type=Path),
                        default=lambda: os.environ.get("ASBATCH_RUNS", "runs"),
                        show_default="$ASBATCH_RUNS or ./runs", help="where run dirs live")(f)


def load_sweep_or_exit(path: Path, stages: tuple[str, ...] = ()):
    """Expand a spec (or a one-run config) and check --stage; bad input: one message naming the field, exit 2."""
    from asbatch.spec import SpecError, load_sweep

    try:
        sweep = load_sweep(path)
        return sweep, sweep.select_stages(stages)
    except SpecError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


def fail(err: Exception | str, code: int = 1) -> None:
    """One `error:` line and the exit code (1: a runtime failure, 2: bad input)."""
    click.echo(f"error: {err}", err=True)
    sys.exit(code)


def submitted_sweep_dir(runs_root: Path, sweep: str) -> Path:
    """A submitted sweep's dir by name under the runs root, or given as a path (exit 2 when there is none)."""
    from asbatch.rundir import SweepDir, list_sweeps

    if SweepDir(sweep).is_submitted():  # a sweep dir given as a path
        return Path(sweep)
    sweep_dir = runs_root / sweep
    if not SweepDir(sweep_dir).is_submitted():
        known = ", ".join(d.name for d in list_sweeps(runs_root) if d.is_submitted()) or "none"
        fail(f"no submitted sweep {sweep!r} under {runs_root} (sweeps there: {known})", 2)
    return sweep_dir


def any_sweep_dir(runs_root: Path, sweep: str) -> Path:
    """A sweep's dir (submitted or run in-process) by name under the runs root, or given as a path."""
    for candidate in (Path(sweep), runs_root / sweep):
        if candidate.is_dir() and candidate != Path():
            return candidate
    fail(f"no sweep {sweep!r} under {runs_root}", 2)
    raise AssertionError  # unreachable: fail exits


def console():
    from rich.console import Console

    return Console(width=max(Console().width, 120))

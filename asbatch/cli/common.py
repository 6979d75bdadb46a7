"""What every command shares: the runs-root option, checking input at the door, finding a sweep, errors.

The door, in order, for `run` and `submit`: the runs root (a string that reaches job scripts), the spec
(asbatch.spec: no torch), `--stage`, a bare weights file named by `model.init_from` (the one check that
loads torch, only when there is such a file), then the data of every run (exit 1 when missing), and only
then is anything created. Bad input is `BadInput` / `SpecError` (exit 2, see `asbatch.cli.app`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from asbatch.cli.app import BadInput, error_line

RUNS_ENV = "ASBATCH_RUNS"
SIGNAL_DELAY_ENV = "ASBATCH_SIGNAL_DELAY_S"  # read by asbatch.launch.slurm when it writes job scripts


def _not_empty(ctx: click.Context, param: click.Parameter, value: str) -> Path:
    if not value.strip():  # `--runs-root "$UNSET"` must not mean the current directory
        raise click.BadParameter("an empty path")
    return Path(value)


def runs_root_option(f):
    return click.option("--runs-root", type=click.Path(file_okay=False), callback=_not_empty,
                        default=lambda: os.environ.get(RUNS_ENV) or "runs",
                        show_default="$ASBATCH_RUNS or ./runs", help="where run dirs live")(f)


def checked_runs_root(runs_root: Path) -> Path:
    """The runs root, refused when it could inject lines into a job script (a control character) or change a
    Slurm file name (`%`): every log path and run dir is under it. Nothing is created here."""
    from asbatch.spec.loading import CONTROL

    origin = "--runs-root" if os.environ.get(RUNS_ENV) != str(runs_root) else f"${RUNS_ENV}"
    for text in (str(runs_root), str(Path(runs_root).absolute())):
        if CONTROL.search(text):
            raise BadInput(f"{origin}: control characters (newline, carriage return, tab...) are not allowed in a "
                           f"path that reaches job scripts (got {text!r})")
        if "%" in text:
            raise BadInput(f"{origin}: '%' is not allowed (Slurm reads %j, %A... in log paths) (got {text!r})")
    if len(str(Path(runs_root).absolute())) > 3000:
        raise BadInput(f"{origin}: a path of more than 3000 characters")
    if runs_root.exists() and not runs_root.is_dir():
        raise BadInput(f"{origin}: {str(runs_root)!r} exists and is not a directory")
    delay = os.environ.get(SIGNAL_DELAY_ENV)
    if delay is not None and not (re.fullmatch(r"[0-9]{1,4}", delay) and 1 <= int(delay) <= 3600):
        raise BadInput(f"${SIGNAL_DELAY_ENV}: expected whole seconds between 1 and 3600 (got {delay!r})")
    return runs_root


def make_runs_root(runs_root: Path) -> None:
    """Create the runs root (a failure is one line, exit 1)."""
    try:
        runs_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        error_line(f"cannot create the runs root {str(runs_root)!r}: {err.strerror or err}", 1)


def load_sweep_or_exit(path: Path, stages: tuple[str, ...] = (), runs_root: Path | None = None):
    """Expand a spec (or a one-run config), check --stage, `init_from` files and the runs root. Bad input:
    one message naming the file, the field and the value, exit 2. Returns (sweep, selected stages)."""
    from asbatch.spec import SpecError, load_sweep

    try:
        if runs_root is not None:
            checked_runs_root(runs_root)
        sweep = load_sweep(path, runs_root=runs_root)
        selected = sweep.select_stages(stages)
        check_init_files(sweep, path)
        return sweep, selected
    except (SpecError, BadInput) as err:
        error_line(str(err), 2)


def check_init_files(sweep, spec_path: Path) -> None:
    """A bare weights file named by `model.init_from` (not a run of this sweep, not a run dir) must load into
    the deterministic twin of each run's model: the spec checks could not look inside it without torch."""
    from asbatch.datafiles import FACTS
    from asbatch.rundir import RunDir, ref_run_id

    files = {}
    for run in sweep.runs:
        value = run.config.model.init_from
        if value and ref_run_id(value) is None and not Path(value).expanduser().is_dir():
            path = Path(value).expanduser()
            if path != RunDir(path.parent).model_file or not RunDir(path.parent).config_file.is_file():
                m, data = run.config.model, FACTS[run.config.data.name]
                files.setdefault((path, m.name, m.width, data.num_classes, data.image_shape[0]), run)
    if not files:
        return
    import torch

    from asbatch.models import build_model

    for (path, name, width, classes, channels), run in files.items():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            build_model(name, classes, in_channels=channels, bayesian=False, width=width).load_state_dict(state)
        except Exception as err:  # noqa: BLE001 - whatever torch says, it does not fit
            raise BadInput(f"{spec_path}: model.init_from {str(path)!r} (run {run.run_id}) does not fit {name} "
                           f"(width {width}, {classes} classes, {channels} input channels): "
                           f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from None


def check_data_or_exit(sweep, stages, dry_run: bool = False) -> None:
    """Every selected run's data sets are on disk (train and test split, the OOD set's test split), under each
    run's data root ($ASBATCH_DATA from the profile's env, else this process's). Missing: exit 1 (a dry run
    only warns), before any run dir or manifest is written."""
    from asbatch.datafiles import DataMissingError, check_present

    needs = []
    for stage in stages:
        for run in stage.runs:
            data = run.config.data
            needs += [(data.name, "train", data.root), (data.name, "test", data.root)]
            if run.config.eval.ood:
                needs.append((run.config.eval.ood, "test", data.root))
    try:
        check_present(needs, {**os.environ, **sweep.env})
    except DataMissingError as err:
        if not dry_run:
            error_line(str(err), 1)
        click.echo(f"warning: {err}", err=True)


def fail(err: Exception | str, code: int = 1) -> None:
    """One `error:` line and the exit code (1: a runtime failure, 2: bad input)."""
    error_line(str(err), code)


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
    """A sweep's dir (submitted or run in-process: it has a manifest or run dirs), by name under the runs
    root or given as a path; anything else is bad input (exit 2)."""
    from asbatch.rundir import SweepDir

    for candidate in (Path(sweep), runs_root / sweep):
        if candidate.is_dir() and candidate != Path():
            if SweepDir(candidate).is_submitted() or SweepDir(candidate).runs():
                return candidate
            fail(f"{str(candidate)!r} is not a sweep: it has no manifest and no run dirs", 2)
    fail(f"no sweep {sweep!r} under {runs_root}", 2)
    raise AssertionError  # unreachable: fail exits


def console():
    from rich.console import Console

    return Console(width=max(Console().width, 120))

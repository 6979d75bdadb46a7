"""What every command shares: the runs-root option, checking input at the door, finding a sweep, errors.

The door, in order, for `run` and `submit`: the runs root (a string that reaches job scripts), the spec
(asbatch.spec: no torch), `--stage`, a weights file or run dir named by `model.init_from` (the one check
that loads torch, only when there is such a file), then the data of every run (exit 1 when missing), and only
then is anything created. Bad input is `BadInput` / `SpecError` (exit 2, see `asbatch.cli.app`).
"""

from __future__ import annotations

import math
import os
import re
import shlex
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


def root_flag(runs_root: str | Path) -> str:
    """` --runs-root X` for the commands a message suggests, unless X is what they use anyway."""
    default = os.environ.get(RUNS_ENV) or "runs"
    return "" if str(runs_root) == default else f" --runs-root {shlex.quote(str(runs_root))}"


def checked_runs_root(runs_root: Path) -> Path:
    """The runs root, refused when it could inject lines into a job script (a control character), change a
    Slurm file name (`%`) or not be written into UTF-8 text (job scripts, the manifest): every log path and
    run dir is under it. Nothing is created here."""
    from asbatch.spec.loading import CONTROL, is_utf8

    origin = "--runs-root" if os.environ.get(RUNS_ENV) != str(runs_root) else f"${RUNS_ENV}"
    for text in (str(runs_root), str(Path(runs_root).absolute())):
        if CONTROL.search(text):
            raise BadInput(f"{origin}: control characters (newline, carriage return, tab...) are not allowed in a "
                           f"path that reaches job scripts (got {text!r})")
        if "%" in text:
            raise BadInput(f"{origin}: '%' is not allowed (Slurm reads %j, %A... in log paths) (got {text!r})")
        if not is_utf8(text):  # job scripts, logs and the manifest are UTF-8 text
            raise BadInput(f"{origin}: the path is not valid UTF-8 (got {text!r})")
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


def load_sweep_or_exit(path: Path, stages: tuple[str, ...] = (), runs_root: Path | None = None,
                       overrides: tuple[str, ...] = ()):
    """Expand a spec (or a one-run config) with the command line's `key=value` overrides, check --stage,
    `init_from` files and the runs root. Bad input: one message naming the file, the field and the value (and
    the override that set it), exit 2. Returns (sweep, selected stages, the overrides as spec paths)."""
    from asbatch.cli.overrides import name_the_argument, spec_overrides
    from asbatch.spec import SpecError, load_sweep

    origin: dict[str, str] = {}
    try:
        if runs_root is not None:
            checked_runs_root(runs_root)
        check_wandb_mode(os.environ)
        mapped, origin = spec_overrides(path, overrides)
        sweep = load_sweep(path, overrides=mapped, runs_root=runs_root)
        check_wandb_mode(sweep.env, f"{path}: profile env ")
        selected = sweep.select_stages(stages)
        check_init_files(sweep, path)
        return sweep, selected, mapped
    except (SpecError, BadInput) as err:
        error_line(name_the_argument(str(err), origin), 2)


def check_wandb_mode(env, where: str = "") -> None:
    """$WANDB_MODE (of this process, or of the profile's env) is a mode wandb knows: anything else would be
    ignored by `run` and fail W&B mid-run."""
    from asbatch.names import WANDB_MODES

    value = env.get("WANDB_MODE")
    if value and value not in WANDB_MODES:  # empty: unset, as wandb reads it
        raise BadInput(f"{where}WANDB_MODE={value!r}: not a W&B mode (wandb accepts: {', '.join(WANDB_MODES)})")


def check_init_files(sweep, spec_path: Path) -> None:
    """A weights file named by `model.init_from` (a file, or a run dir's final weights once it has finished;
    not a `run:` of a sweep) must load into the deterministic twin of each run's model: the spec checks
    compared a run dir's config but could not look inside its weights without torch."""
    from asbatch.datafiles import FACTS
    from asbatch.rundir import RunDir, ref_run_id
    from asbatch.spec.errors import user_path

    files = {}
    for run in sweep.runs:
        value = run.config.model.init_from
        if value and ref_run_id(value) is None:
            path = user_path(value, "model.init_from")
            path = RunDir(path).model_file if path.is_dir() else path
            if path.is_file():  # a run dir without its final weights has not finished: nothing to check yet
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
    from asbatch.datafiles import DataMissingError, check_present, data_needs

    needs = data_needs(run.config for stage in stages for run in stage.runs)
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
    from asbatch.rundir import SweepDir

    if SweepDir(sweep).is_submitted():  # a sweep dir given as a path
        return Path(sweep)
    sweep_dir = runs_root / sweep
    if not SweepDir(sweep_dir).is_submitted():
        if SweepDir(sweep_dir).runs():
            fail(f"sweep {sweep!r} under {runs_root} was trained by `asbatch run`, not submitted: no job to cancel or "
                 "retry (Ctrl-C stops `asbatch run`; the same command resumes it)", 2)
        fail(f"no submitted sweep {sweep!r} under {runs_root}{_known_sweeps(runs_root, sweep, submitted=True)}", 2)
    return sweep_dir


def _known_sweeps(runs_root: Path, name: str, submitted: bool = False) -> str:
    """' (sweeps there: a, b; did you mean 'a'?)' for a sweep name that is not there."""
    import difflib

    from asbatch.rundir import list_sweeps

    try:
        known = [d.name for d in list_sweeps(runs_root) if d.is_submitted() or not submitted]
    except (OSError, ValueError):  # an unreadable runs root (RunDirError): the message stays without the list
        return ""
    hint = ""
    if Path(name).suffix in (".yaml", ".yml"):
        hint = "; SWEEP is a sweep's name (the spec's `sweep:`), not a spec file"
    elif close := difflib.get_close_matches(name, known, n=1):
        hint = f"; did you mean {close[0]!r}?"
    listed = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
    return f" ({'submitted ' if submitted else ''}sweeps there: {listed or 'none'}{hint})"


def any_sweep_dir(runs_root: Path, sweep: str) -> Path:
    """A sweep's dir (submitted or run in-process: it has a manifest or run dirs), by name under the runs
    root or given as a path; anything else is bad input (exit 2)."""
    from asbatch.rundir import SweepDir

    for candidate in (Path(sweep), runs_root / sweep):
        if candidate.is_dir() and candidate != Path():
            if SweepDir(candidate).is_submitted() or SweepDir(candidate).runs():
                return candidate
            fail(f"{str(candidate)!r} is not a sweep: it has no manifest and no run dirs", 2)
    fail(f"no sweep {sweep!r} under {runs_root}{_known_sweeps(runs_root, sweep)}", 2)
    raise AssertionError  # unreachable: fail exits


MIN_WIDTH = 40  # narrower, every column would be dropped or folded into one character a line


def console():
    """A console as wide as the terminal (80 columns off a terminal, or $COLUMNS; rich ignores a COLUMNS that
    is not a number) but at least MIN_WIDTH: `COLUMNS=0` must not hide every table. Tables fit, never wrap."""
    from rich.console import Console

    out = Console()
    return out if out.width >= MIN_WIDTH else Console(width=MIN_WIDTH)


# ------------------------------------------------------------------------------- arguments and completion

YEAR_S = 365 * 24 * 3600.0


class FiniteFloat(click.FloatRange):
    """A float option within [min, max] that is a number: `nan` passes every comparison and `inf` overflows
    the timers it reaches (a sleep, a child's timeout), so both are refused while parsing (exit 2)."""

    name = "float"

    def __init__(self, min: float, max: float = YEAR_S) -> None:
        super().__init__(min, max)

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def spec_argument(metavar: str = "SPEC"):
    return click.argument("spec_path", metavar=metavar, type=click.Path(exists=True, dir_okay=False, path_type=Path))


overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


def _runs_root_of(ctx: click.Context) -> Path:
    return Path(ctx.params.get("runs_root") or os.environ.get(RUNS_ENV) or "runs")


def complete_sweeps(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion: the sweeps under the runs root (--runs-root if typed before, else $ASBATCH_RUNS or ./runs)."""
    from asbatch.rundir import list_sweeps

    return [d.name for d in list_sweeps(_runs_root_of(ctx)) if d.name.startswith(incomplete)]


def complete_runs(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion: the run ids of every sweep under the runs root."""
    from asbatch.rundir import list_sweeps

    ids = {i for d in list_sweeps(_runs_root_of(ctx)) for i in [*_submitted(d), *(r.run_id for r in d.runs())]}
    return sorted(i for i in ids if i.startswith(incomplete))


def _submitted(sweep_dir) -> list[str]:
    from asbatch.rundir import RunDirError

    try:
        return sweep_dir.submitted_run_ids()
    except RunDirError:
        return []


def sweep_argument(required: bool = True):
    return click.argument("sweep", required=required, shell_complete=complete_sweeps)


def fit_table(table, width: int, droppable: list[str]):
    """The rich table without its `droppable` columns (by header, in this order) while it is wider than
    `width`: a table never wraps into broken boxes on a narrow terminal. Returns the headers dropped."""
    from rich.console import Console

    measure = Console(width=10_000)
    dropped = []
    for header in droppable:
        if measure.measure(table).maximum <= width:
            break
        table.columns = [c for c in table.columns if c.header != header]
        dropped.append(header)
    return dropped

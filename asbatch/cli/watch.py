"""`asbatch status / wait / logs`: following a sweep, submitted or run in-process, while and after it trains."""

from __future__ import annotations

import time
from pathlib import Path

import click

from asbatch.cli.app import main
from asbatch.cli.common import (
    FiniteFloat,
    any_sweep_dir,
    complete_runs,
    fail,
    root_flag,
    runs_root_option,
    sweep_argument,
)
from asbatch.cli.common import console as make_console
from asbatch.names import duration

ACC_NOTE = "acc %: final ensembled accuracy; (x): last epoch's test accuracy (mean weights)"


def _acc(r) -> str:
    if r.final_acc is not None:
        return f"{100 * r.final_acc:.2f}"
    return f"({100 * r.test_acc:.1f})" if r.test_acc is not None else "-"


def status_table(st, width: int):
    """The runs of a sweep as a table that fits `width` columns (the job column only where there is room)."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"sweep {st.sweep} ({st.sweep_dir})", box=box.SIMPLE_HEAD, show_edge=False,
                  title_justify="left")
    wide = width >= 100 and any(r.job_id for r in st.runs)
    columns = ["run", "grid point", "state", *(["job"] if wide else []), "epoch", "elapsed", "ETA", "acc %"]
    for col in columns:
        right = col in ("epoch", "elapsed", "ETA", "acc %")
        table.add_column(col, justify="right" if right else "left", no_wrap=col != "grid point",
                         overflow="fold" if col == "grid point" else "ellipsis")
    for r in st.runs:
        state = r.state + (" *" if r.reason else "")
        epoch = f"{r.epochs_done if r.epochs_done is not None else '-'}/{r.epochs or '?'}"
        eta = duration(r.eta_s) if r.eta_s is not None else "-"
        row = [r.run_id, r.point, state, *([r.job_id or "-"] if wide else []), epoch, duration(r.elapsed_s), eta,
               _acc(r)]
        table.add_row(*row)
    return table


def print_status(st) -> None:
    console = make_console()
    console.print(status_table(st, console.width))
    counts = ", ".join(f"{n} {s}" for s, n in sorted(st.counts().items()))
    console.print(f"{len(st.runs)} run{'s' if len(st.runs) != 1 else ''}: {counts}", soft_wrap=True)
    for r in st.runs:
        if r.reason:
            console.print(f"* {r.run_id} {r.state}: {r.reason}", soft_wrap=True, markup=False, highlight=False)
    console.print(ACC_NOTE, style="dim", soft_wrap=False)
    if st.note:
        console.print(f"note: {st.note}", soft_wrap=True)


def _sweep_list(runs_root: Path) -> None:
    from rich.table import Table

    from asbatch.launch import DamagedStateError, LaunchError, sweep_status
    from asbatch.rundir import RunDirError, list_sweeps

    console = make_console()
    sweeps = list_sweeps(runs_root)
    if not sweeps:  # an empty table says nothing about why
        where = "does not exist" if not runs_root.exists() else "holds no sweeps"
        click.echo(f"{runs_root} {where} (--runs-root, or $ASBATCH_RUNS, names another); start one with "
                   "`asbatch run SPEC` or `asbatch submit SPEC`")
        return
    table = Table(title=f"sweeps under {runs_root}", title_justify="left")
    for col in ("sweep", "runs", "states", "by"):
        table.add_column(col, no_wrap=col != "states")
    damaged = []
    for sweep_dir in sweeps:
        try:  # one damaged (or unreadable) sweep must not hide the healthy ones
            by = "submit" if sweep_dir.is_submitted() else "run"
            st = sweep_status(sweep_dir, strict=False)
        except (DamagedStateError, RunDirError, LaunchError) as err:
            damaged.append(str(err))
            table.add_row(sweep_dir.name, "?", "damaged (see below)", "?")
            continue
        if any(r.executor == "run" for r in st.runs) and by == "submit":
            by = "submit, run"
        table.add_row(st.sweep, str(len(st.runs)), ", ".join(f"{n} {s}" for s, n in sorted(st.counts().items())), by)
    console.print(table)
    for message in damaged:
        click.echo(f"warning: {' '.join(message.split())}", err=True)


@main.command("status", short_help="Show a sweep's runs: state, epoch, ETA, accuracy.")
@sweep_argument(required=False)
@runs_root_option
def status_command(sweep: str | None, runs_root: Path) -> None:
    """Show each run of SWEEP (submitted, or trained by `asbatch run`): its grid point, state, epochs done,
    elapsed training time, ETA and, once done, the final ensembled accuracy; why a run failed below.

    Without SWEEP, list the sweeps under the runs root.
    """
    from asbatch.launch import DamagedStateError, LaunchError, sweep_status
    from asbatch.rundir import RunDirError

    if sweep is None:
        _sweep_list(runs_root)
        return
    try:
        st = sweep_status(any_sweep_dir(runs_root, sweep), strict=False)  # controller away: a note
    except (DamagedStateError, RunDirError) as err:
        fail(err, 2)
    except LaunchError as err:
        fail(err)
    print_status(st)


def progress_line(st) -> str:
    done = sum(r.state == "COMPLETED" for r in st.runs)
    others = ", ".join(f"{n} {s}" for s, n in sorted(st.counts().items()) if s != "COMPLETED")
    running = [r for r in st.runs if r.state == "RUNNING"]
    now = "; ".join(f"{r.run_id} epoch {r.epochs_done or 0}/{r.epochs}" for r in running[:3])
    eta = max((r.eta_s for r in running if r.eta_s is not None), default=None)
    return (f"{st.sweep}: {done}/{len(st.runs)} done" + (f", {others}" if others else "")
            + (f" ({now}{', ...' if len(running) > 3 else ''})" if now else "")
            + (f", ETA of the running runs {duration(eta)}" if eta is not None else ""))


@main.command("wait", short_help="Block until a sweep's runs are done; exit 1 if any failed.")
@sweep_argument()
@click.option("--poll", type=FiniteFloat(0.1, 3600), default=10.0, show_default=True,
              help="seconds between looks at the sweep")
@click.option("--timeout", type=FiniteFloat(0), default=None,
              help="give up after this many seconds (at most a year)")
@runs_root_option
def wait_command(sweep: str, poll: float, timeout: float | None, runs_root: Path) -> None:
    """Block until no run of SWEEP is queued or running, printing a line whenever its progress changes.

    Exits 0 when every run completed, 1 when any did not (each such run is named with its reason) or when
    --timeout passed first.
    """
    from asbatch.launch import DamagedStateError, LaunchError, wait_for_sweep
    from asbatch.rundir import RunDirError

    seen, noted = [None], [None]

    def on_poll(st) -> None:
        key = [(r.run_id, r.state, r.epochs_done) for r in st.runs]
        if key != seen[0]:
            seen[0] = key
            click.echo(f"{time.strftime('%H:%M:%S')} {progress_line(st)}")
        if st.note != noted[0]:  # e.g. Slurm's controller away: said once, not at every poll
            noted[0] = st.note
            if st.note:
                click.echo(f"{time.strftime('%H:%M:%S')} note: {st.note}")

    try:
        final = wait_for_sweep(any_sweep_dir(runs_root, sweep), poll_s=poll, timeout_s=timeout, on_poll=on_poll)
    except (DamagedStateError, RunDirError) as err:
        fail(err, 2)
    except LaunchError as err:
        fail(err)
    bad = [r for r in final.runs if r.state != "COMPLETED"]
    if bad:
        for r in bad:
            click.echo(f"  {r.run_id} ({r.point}) {r.state}{': ' + r.reason if r.reason else ''}", err=True)
        fail(f"{len(bad)} of {len(final.runs)} runs of {final.sweep} did not complete "
             f"({', '.join(sorted({r.state for r in bad}))}); see `asbatch status {final.sweep}{root_flag(runs_root)}`")
    click.echo(f"{final.sweep}: all {len(final.runs)} runs completed; results: asbatch table {final.sweep}"
               f"{root_flag(runs_root)}")


def _timestamp(iso: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return float("inf")


@main.command("logs", short_help="Print a run's output (stdout or stderr).")
@click.argument("run_id", shell_complete=complete_runs)
@click.option("--sweep", help="the run's sweep (default: search every sweep under the runs root)")
@click.option("--err", "stderr", is_flag=True, help="print stderr instead of stdout")
@click.option("--task", type=click.IntRange(0, 100_000), default=0, show_default=True,
              help="task (rank) of a multi-task Slurm job")
@runs_root_option
def logs_command(run_id: str, sweep: str | None, stderr: bool, task: int, runs_root: Path) -> None:
    """Print RUN_ID's output: its own log under the local executor, its latest job's log on Slurm."""
    from asbatch.launch import DamagedStateError, Manifest
    from asbatch.rundir import SweepDir, list_sweeps

    sweep_dirs = [SweepDir(any_sweep_dir(runs_root, sweep))] if sweep else list_sweeps(runs_root)
    found, damaged = [], []
    for sweep_dir in sweep_dirs:
        try:
            records = Manifest.load(sweep_dir).latest() if sweep_dir.is_submitted() else {}
        except DamagedStateError as err:
            damaged.append(err)
            continue
        ids = set(records) | {r.run_id for r in sweep_dir.runs()}
        matches = [run_id] if run_id in ids else sorted(i for i in ids if run_id and i.startswith(run_id))
        found += [(sweep_dir, records.get(i), i) for i in matches]  # the start of an id names it, as in `show`
    if len(found) > 1 and len({i for _, _, i in found}) > 1:
        fail(f"{run_id!r} starts {len(found)} run ids ({', '.join(sorted(i for _, _, i in found)[:5])}...); give more "
             "of it", 2)
    if not found:
        fail(damaged[0] if damaged else f"no run {run_id!r} under {runs_root}{' in sweep ' + sweep if sweep else ''}",
             2)
    if len(found) > 1:
        fail(f"run {run_id!r} is in several sweeps ({', '.join(d.name for d, _, _ in found)}); name one with --sweep",
             2)
    sweep_dir, record, run_id = found[0]
    run_dir = sweep_dir.run(run_id)
    if record is None or record.executor == "debug":
        how = "`asbatch run`" if record is None else "the debug executor"
        fail(f"run {run_id} was trained in-process by {how}: its output went to that terminal; its per-epoch "
             f"metrics are in {run_dir.metrics_file}", 1)
    own = run_dir.stderr_log if stderr else run_dir.stdout_log
    out, err = sweep_dir.job_logs(record.job_id, task, record.executor)
    path = err if stderr else out
    # its own log where its job's log mixes several runs (the local executor, a packed task): written since
    # this submission (an older attempt's own log is not this job's)
    if own.exists() and (record.executor == "local" or own.stat().st_mtime >= _timestamp(record.submitted_at)):
        path = own
    if not path.exists():
        fail(f"no log yet at {path} (job {record.job_id} has not started?)", 1)
    click.echo(f"==> {path} <==", err=True)
    click.echo(path.read_text(errors="replace"), nl=False)

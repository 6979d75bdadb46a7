"""`asbatch submit / status / logs / cancel / retry`: job arrays on Slurm (or locally) and their state."""

from __future__ import annotations

from pathlib import Path

import click

from asbatch.cli.app import main
from asbatch.cli.common import (
    check_data_or_exit,
    checked_runs_root,
    fail,
    load_sweep_or_exit,
    make_runs_root,
    runs_root_option,
    submitted_sweep_dir,
)
from asbatch.cli.common import console as make_console
from asbatch.names import EXECUTORS


@main.command("submit")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
              help="slurm: job arrays via sbatch; local: one background process; debug: in this process; "
                   "auto: slurm where sbatch exists, else local")
@click.option("--dry-run", is_flag=True, help="print the runs and the sbatch parameters; submit nothing")
@click.option("--stage", "stages", multiple=True, help="only these stages (default: all)")
@runs_root_option
def submit_command(spec_path: Path, executor: str, dry_run: bool, stages: tuple[str, ...], runs_root: Path) -> None:
    """Submit a spec: one job array per stage, each after its upstream stages (afterok).

    Finished runs and runs already queued or running are skipped, so submitting a spec
    again submits only what is missing. Returns at once; follow with `asbatch status SWEEP`.
    """
    sweep, selected = load_sweep_or_exit(spec_path, stages, runs_root)
    check_data_or_exit(sweep, selected, dry_run=dry_run)
    from asbatch.launch import DamagedStateError, LaunchError, submit

    if not dry_run:
        make_runs_root(runs_root)
    try:
        manifest = submit(sweep, runs_root, executor=executor, stages=stages or None, dry_run=dry_run,
                          spec_path=spec_path)
    except DamagedStateError as err:
        fail(err, 2)
    except LaunchError as err:
        fail(err)
    console = make_console()
    if dry_run:
        _print_dry_run(console, sweep, manifest)
        return
    subs = manifest.submitted
    kind = subs[0].executor if subs else executor
    console.print(f"sweep [bold]{sweep.name}[/] ({spec_path}) -> {manifest.sweep_dir.path}  [executor: {kind}]")
    for sub in subs:
        skipped = f", {len(sub.skipped)} skipped ({_why(sub.skipped)})" if sub.skipped else ""
        if not sub.run_ids:
            console.print(f"  stage {sub.name}: nothing to submit{skipped}")
            continue
        after = f", after {sub.dependency}" if sub.dependency else ""
        what = "array" if kind == "slurm" else "job"
        one_job = len(set(sub.job_ids)) == 1
        logs = f"{sub.log_dir}/{sub.job_ids[0] if one_job else sub.array_job_id + '_<task>'}/"
        console.print(f"  stage {sub.name}: {what} {sub.array_job_id}, {len(sub.run_ids)} runs{skipped}{after}; "
                      f"logs in {logs}", soft_wrap=True)
    if kind == "debug":
        console.print("(debug executor: the runs ran in this process)")
    console.print(f"follow with: asbatch status {sweep.name} --runs-root {runs_root}", soft_wrap=True)


def _why(skipped: dict[str, str]) -> str:
    reasons: dict[str, int] = {}
    for reason in skipped.values():
        key = reason.split(" as ")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in reasons.items())


def _print_dry_run(console, sweep, manifest) -> None:
    from rich.table import Table

    runs = Table(title=f"{sweep.name}: runs (dry run: nothing submitted)")
    for col in ("stage", "run", "grid point", "after", "action"):
        runs.add_column(col, overflow="fold")
    subs = {s.name: s for s in manifest.submitted}
    for stage in sweep.stages:
        sub = subs.get(stage.name)
        for run in stage.runs:
            if sub is None:
                action = "not selected"
            elif run.run_id in sub.skipped:
                action = f"skip: {sub.skipped[run.run_id]}"
            else:
                action = "submit"
            point = ", ".join(f"{k}={v}" for k, v in run.point.items()) or "-"
            after = ", ".join(run.upstream.values()) or "-"
            runs.add_row(stage.name, run.run_id, point, after, action)
    console.print(runs)
    for sub in manifest.submitted:
        console.print(f"[bold]stage {sub.name}[/]: {len(sub.run_ids)} runs to submit "
                      f"({sub.executor} executor)")
        for flag in sub.flags:
            console.print(f"    {flag}", soft_wrap=True, markup=False, highlight=False)


@main.command("status")
@click.argument("sweep", required=False)
@runs_root_option
def status_command(sweep: str | None, runs_root: Path) -> None:
    """Show each run of SWEEP: stage, state (Slurm or run dir), epoch and last test accuracy.

    Without SWEEP, list the sweeps under the runs root.
    """
    from rich.table import Table

    from asbatch.launch import DamagedStateError, LaunchError, sweep_status
    from asbatch.rundir import RunDirError, list_sweeps

    console = make_console()
    try:
        if sweep is None:
            table = Table(title=f"sweeps under {runs_root}")
            for col in ("sweep", "runs", "states"):
                table.add_column(col)
            damaged = []
            for sweep_dir in (d for d in list_sweeps(runs_root) if d.is_submitted()):
                try:  # one damaged sweep must not hide the healthy ones
                    st = sweep_status(sweep_dir)
                except (DamagedStateError, RunDirError) as err:
                    damaged.append(str(err))
                    table.add_row(sweep_dir.name, "?", "damaged (see below)")
                    continue
                counts = ", ".join(f"{n} {s}" for s, n in sorted(st.counts().items()))
                table.add_row(st.sweep, str(len(st.runs)), counts)
            console.print(table)
            for message in damaged:
                click.echo(f"warning: {' '.join(message.split())}", err=True)
            return
        st = sweep_status(submitted_sweep_dir(runs_root, sweep))
    except (DamagedStateError, RunDirError) as err:
        fail(err, 2)
    except LaunchError as err:
        fail(err)
    table = Table(title=f"sweep {st.sweep} ({st.sweep_dir})")
    for col in ("run", "stage", "state", "job", "epoch", "test acc"):
        table.add_column(col, justify="right" if col in ("epoch", "test acc") else "left", no_wrap=col != "state")
    for r in st.runs:
        state = f"{r.state} ({r.reason})" if r.reason else r.state
        epoch = f"{r.epochs_done}/{r.epochs}" if r.epochs_done is not None else f"-/{r.epochs}"
        acc = f"{100 * r.test_acc:.2f}%" if r.test_acc is not None else "-"
        table.add_row(r.run_id, r.stage, state, r.job_id or "-", epoch, acc)
    console.print(table)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(st.counts().items()))
    console.print(f"{len(st.runs)} runs: {counts}")
    if st.note:
        console.print(f"note: {st.note}", soft_wrap=True)


@main.command("logs")
@click.argument("run_id")
@click.option("--sweep", help="the run's sweep (default: search every sweep under the runs root)")
@click.option("--err", "stderr", is_flag=True, help="print stderr instead of stdout")
@click.option("--task", type=click.IntRange(0, 100_000), default=0, show_default=True,
              help="task (rank) of a multi-task job")
@runs_root_option
def logs_command(run_id: str, sweep: str | None, stderr: bool, task: int, runs_root: Path) -> None:
    """Print the stdout (or stderr) of RUN_ID's latest job."""
    from asbatch.launch import DamagedStateError, Manifest
    from asbatch.rundir import SweepDir, list_sweeps

    sweep_dirs = [SweepDir(submitted_sweep_dir(runs_root, sweep))] if sweep else [
        d for d in list_sweeps(runs_root) if d.is_submitted()]
    found, damaged = [], []
    for sweep_dir in sweep_dirs:
        try:
            record = Manifest.load(sweep_dir).latest().get(run_id)
        except DamagedStateError as err:
            damaged.append(err)
            continue
        if record:
            found.append((sweep_dir, record))
    if not found:
        fail(damaged[0] if damaged else f"run {run_id!r} was not submitted from {runs_root}"
             f"{' in sweep ' + sweep if sweep else ''}", 2)
    if len(found) > 1:
        fail(f"run {run_id!r} is in several sweeps ({', '.join(d.name for d, _ in found)}); name one with --sweep", 2)
    sweep_dir, record = found[0]
    out, err = sweep_dir.job_logs(record.job_id, task)
    path = err if stderr else out
    if not path.exists():
        fail(f"no log yet at {path} (job {record.job_id} has not started?)", 1)
    click.echo(f"==> {path} <==", err=True)
    click.echo(path.read_text(errors="replace"), nl=False)


@main.command("cancel")
@click.argument("sweep")
@runs_root_option
def cancel_command(sweep: str, runs_root: Path) -> None:
    """Cancel SWEEP's queued and running jobs (runs keep their checkpoints; `retry` resumes them)."""
    from asbatch.launch import DamagedStateError, LaunchError, cancel

    try:
        cancelled = cancel(submitted_sweep_dir(runs_root, sweep))
    except DamagedStateError as err:
        fail(err, 2)
    except LaunchError as err:
        fail(err)
    click.echo(f"cancelled {', '.join(cancelled)}" if cancelled else "nothing to cancel: no queued or running jobs")


@main.command("retry")
@click.argument("sweep")
@click.option("--executor", type=click.Choice(EXECUTORS), default=None,
              help="default: the executor the sweep was last submitted with")
@runs_root_option
def retry_command(sweep: str, executor: str | None, runs_root: Path) -> None:
    """Resubmit SWEEP's failed, cancelled, timed-out, node-failed and out-of-memory runs (and runs stuck
    behind a failed upstream), one array per stage again; they resume from their checkpoints."""
    from asbatch.launch import DamagedStateError, LaunchError, retry

    try:
        manifest = retry(submitted_sweep_dir(checked_runs_root(runs_root), sweep), executor=executor)
    except DamagedStateError as err:
        fail(err, 2)
    except LaunchError as err:
        fail(err)
    subs = [s for s in manifest.submitted if s.run_ids]
    if not subs:
        click.echo("nothing to retry: no failed, cancelled or timed-out runs")
        return
    for sub in subs:
        after = f", after {sub.dependency}" if sub.dependency else ""
        click.echo(f"stage {sub.name}: resubmitted {len(sub.run_ids)} runs as {sub.array_job_id}{after}")

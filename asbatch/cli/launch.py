"""`asbatch submit / cancel / retry`: a sweep's job arrays on Slurm (or locally); `watch` follows them."""

from __future__ import annotations

import re
from pathlib import Path

import click

from asbatch.cli.app import main
from asbatch.cli.common import (
    check_data_or_exit,
    checked_runs_root,
    fail,
    load_sweep_or_exit,
    overrides_argument,
    root_flag,
    runs_root_option,
    spec_argument,
    submitted_sweep_dir,
    sweep_argument,
)
from asbatch.cli.common import console as make_console
from asbatch.names import EXECUTORS, SENSITIVE_NAME_PARTS, count, point_label

SECRET_NAME = re.compile(SENSITIVE_NAME_PARTS, re.IGNORECASE)  # as in --dry-run's flags


@main.command("submit", short_help="Submit a spec: one job array per stage; returns at once.")
@spec_argument()
@overrides_argument
@click.option("--executor", type=click.Choice(EXECUTORS), default="auto", show_default=True,
              help="slurm: job arrays via sbatch; local: one background process; debug: in this process; "
                   "auto: slurm where sbatch exists, else local")
@click.option("--dry-run", is_flag=True, help="print the runs and what would run them; submit nothing")
@click.option("--stage", "stages", multiple=True, help="only these stages (default: all)")
@click.option("--jobs", "-j", type=click.IntRange(1, 4096), default=None,
              help="local executor: train up to this many runs at once (default: fill the cores)")
@runs_root_option
def submit_command(spec_path: Path, overrides: tuple[str, ...], executor: str, dry_run: bool, stages: tuple[str, ...],
                   jobs: int | None, runs_root: Path) -> None:
    """Submit a spec: one job array per stage, each run after its own upstream runs.

    OVERRIDES are KEY=VALUE as for `asbatch run` (`schedule.epochs=2`, `adversarial.lam=[0,0.8]`); they
    are part of the runs' configs and ids and recorded in the manifest (`retry` applies them again).
    Finished runs and runs already queued or running are skipped, so submitting a spec again submits only
    what is missing. Returns at once; follow with `asbatch status SWEEP` or `asbatch wait SWEEP`.
    """
    sweep, selected, mapped = load_sweep_or_exit(spec_path, stages, runs_root, overrides)
    check_data_or_exit(sweep, selected, dry_run=dry_run)
    from asbatch.launch import DamagedStateError, LaunchError, UnmetUpstreamError, submit

    try:  # submit() creates the runs root once the plan stands: a plan that cannot be submitted writes nothing
        manifest = submit(sweep, runs_root, executor=executor, stages=stages or None, dry_run=dry_run,
                          spec_path=spec_path, overrides=mapped, jobs=jobs)
    except (DamagedStateError, UnmetUpstreamError) as err:
        fail(err, 2)
    except LaunchError as err:
        fail(err)
    console = make_console()
    if dry_run:
        _print_dry_run(console, sweep, manifest, jobs)
        return
    subs = manifest.submitted
    kind = subs[0].executor if subs else executor
    console.print(f"sweep [bold]{sweep.name}[/] ({spec_path}) -> {manifest.sweep_dir.path}  [executor: {kind}]")
    for sub in subs:
        skipped = f", {len(sub.skipped)} skipped ({_why(sub.skipped)})" if sub.skipped else ""
        if not sub.run_ids:
            console.print(f"  stage {sub.label}: nothing to submit{skipped}")
            continue
        after = f", after {sub.dependency}" if sub.dependency else ""
        what = "array" if kind == "slurm" else "job"
        one_job = len(set(sub.job_ids)) == 1
        logs = f"; logs in {sub.log_dir}/{sub.job_ids[0] if one_job else sub.array_job_id + '_<task>'}/" \
            if kind == "slurm" else ""
        runs = count(len(sub.run_ids), "run")
        console.print(f"  stage {sub.label}: {what} {sub.array_job_id}, {runs}{skipped}{after}{logs}", soft_wrap=True)
    if kind == "debug":
        console.print("(debug executor: the runs ran in this process)")
    root = root_flag(runs_root)
    console.print(f"follow with: asbatch status {sweep.name}{root}  (or: asbatch wait {sweep.name}{root}; "
                  f"asbatch logs RUN{root})", soft_wrap=True)


def _why(skipped: dict[str, str]) -> str:
    reasons: dict[str, int] = {}
    for reason in skipped.values():
        key = reason.split(" as ")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in reasons.items())


def _print_dry_run(console, sweep, manifest, jobs: int | None = None) -> None:
    from rich.table import Table

    from asbatch.launch.plan import packing_lines

    runs = Table(title=f"{sweep.name}: runs (dry run: nothing submitted)")
    for col in ("stage", "run", "grid point", "after", "action"):
        runs.add_column(col, overflow="fold", no_wrap=col == "run")
    skipped = {run_id: why for s in manifest.submitted for run_id, why in s.skipped.items()}
    selected = {s.name for s in manifest.submitted}  # a stage split into several arrays is one stage here
    for stage in sweep.stages:
        for run in stage.runs:
            if stage.name not in selected:
                action = "not selected"
            elif run.run_id in skipped:
                action = f"skip: {skipped[run.run_id]}"
            else:
                action = "submit"
            point = point_label(run.point)
            after = ", ".join(run.upstream.values()) or "-"
            runs.add_row(stage.name, run.run_id, point, after, action)
    console.print(runs)
    for sub in manifest.submitted:
        console.print(f"[bold]stage {sub.label}[/]: {count(len(sub.run_ids), 'run')} to submit "
                      f"({sub.executor} executor)")
        for flag in sub.flags:
            console.print(f"    {flag}", soft_wrap=True, markup=False, highlight=False)
        if sub.executor == "slurm":
            for line in packing_lines(sub.stage, sub.runs):
                console.print(f"  {line}", soft_wrap=True, markup=False, highlight=False)
    local = [run_id for sub in manifest.submitted if sub.executor != "slurm" for run_id in sub.run_ids]
    if local:
        from asbatch.launch.pack import local_jobs

        in_background = manifest.submitted[0].executor == "local"
        at_once = local_jobs(sweep.env, len(local), jobs)[0] if in_background else 1
        where = "in one background process" if in_background else "in this process"
        how = "one after another" if at_once == 1 else f"up to {at_once} at once"
        env = " ".join(f"{k}={'***' if SECRET_NAME.search(k) else v}" for k, v in sweep.env.items()) or "none"
        console.print(f"{where}, {how} in stage order: {', '.join(local)}; environment from the "
                      f"profile: {env}; each run's output in its run dir (asbatch logs RUN)", soft_wrap=True,
                      markup=False, highlight=False)
        if any(stage.resources.setup or stage.resources.python for stage in sweep.stages):
            console.print("the profile's setup lines and python command are not used here: they run in Slurm jobs "
                          "only (this Python runs the runs)", soft_wrap=True, markup=False, highlight=False)


@main.command("cancel", short_help="Cancel a sweep's queued and running jobs.")
@sweep_argument()
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


@main.command("retry", short_help="Resubmit a sweep's failed, cancelled and timed-out runs.")
@sweep_argument()
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
        click.echo(f"stage {sub.name}: resubmitted {count(len(sub.run_ids), 'run')} as {sub.array_job_id}{after}")

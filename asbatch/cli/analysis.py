"""`asbatch table / report / sync`: the paper's tables, the sweep report, uploading offline W&B runs."""

from __future__ import annotations

from pathlib import Path

import click

from asbatch.cli.app import main
from asbatch.cli.common import FiniteFloat, any_sweep_dir, fail, runs_root_option, sweep_argument


def _finished_records(sweep_dir: Path, **how):
    """The sweep's records; none finished is a failure (exit 1) before anything is printed or written."""
    from asbatch.analysis import describe, load_records

    records = load_records(sweep_dir, **how)
    if not records:
        fail(f"sweep {sweep_dir.name} has no finished runs yet ({describe(records)})", 1)
    return records


@main.command("table", short_help="Print the paper's tables for a sweep (or one row per run).")
@sweep_argument()
@click.option("--source", type=click.Choice(["local", "wandb"]), default="local", show_default=True,
              help="read run dirs, or the W&B API (runs grouped by sweep)")
@click.option("--format", "fmt", type=click.Choice(["md", "latex", "csv", "html"]), default="md", show_default=True)
@click.option("--wandb-path", default=None, help="ENTITY/PROJECT (default: from the runs' tracking config)")
@click.option("--per-run", is_flag=True,
              help="one row per run (config, every metric, train summary: asbatch.results) instead of the tables")
@runs_root_option
def table_command(sweep: str, source: str, fmt: str, wandb_path: str | None, per_run: bool, runs_root: Path) -> None:
    """Print the paper's tables for a sweep: lowest / highest / ensembled accuracy, accuracy on the 20-80%
    most certain data, calibration and OOD columns; mean +- std over seeds, AS rows bold where they win.
    With --per-run: one row per run instead."""
    from asbatch.analysis import describe, sweep_tables

    sweep_dir = runs_root / sweep if source == "wandb" else any_sweep_dir(runs_root, sweep)
    records = _finished_records(sweep_dir, source=source, wandb_path=wandb_path)
    click.echo(describe(records), err=True)
    if per_run:
        from asbatch.results import per_run_table, records_frame

        click.echo(per_run_table(records_frame(records), fmt, title=f"Runs of {sweep_dir.name}"), nl=False)
        return
    click.echo(sweep_tables(records, fmt=fmt), nl=False)


@main.command("report", short_help="Write a sweep's report: tables and figures (and a W&B Report).")
@sweep_argument()
@click.option("--wandb/--no-wandb", "to_wandb", default=None,
              help="also save a W&B Report (default: when W&B is online, i.e. an API key and a route to it)")
@runs_root_option
def report_command(sweep: str, to_wandb: bool | None, runs_root: Path) -> None:
    """Write the sweep's report (tables + plots) as Markdown and HTML with PNGs into <sweep>/report/,
    and, when W&B is online, save a W&B Report with the tables and panels over the sweep's runs."""
    from asbatch.analysis import build_static_report, sweep_tables
    from asbatch.tracking import resolve_mode

    sweep_dir = any_sweep_dir(runs_root, sweep)
    records = _finished_records(sweep_dir, history=True)  # the training curves need the per-epoch rows
    click.echo(build_static_report(sweep_dir, records=records))
    if to_wandb is None:
        to_wandb = resolve_mode("auto") == "online"
    if not to_wandb:
        click.echo("W&B offline: no W&B Report saved (run `asbatch report --wandb` where W&B is online)", err=True)
        return
    from asbatch.analysis import build_wandb_report, default_wandb_path
    from asbatch.analysis.records import asking_wandb

    entity, _, project = default_wandb_path(sweep_dir).rpartition("/")
    with asking_wandb(f"saving the report to {default_wandb_path(sweep_dir)}"):
        report = build_wandb_report(sweep_dir.name, project, entity or None, sweep_tables(records, fmt="md"),
                                    records)
        click.echo(report.save().url)


@main.command("sync", short_help="Upload a sweep's offline W&B runs (from a login node).")
@sweep_argument()
@click.option("--timeout", "timeout_s", type=FiniteFloat(1), default=600.0, show_default=True,
              help="seconds one `wandb sync` (one segment) may take (at most a year)")
@runs_root_option
def sync_command(sweep: str, timeout_s: float, runs_root: Path) -> None:
    """Upload a sweep's offline W&B runs (from a login node with internet); each run's segments are synced
    in order into its one W&B id, and what was synced is recorded in each run dir, so a rerun continues."""
    from asbatch.rundir import SweepDir, offline_segments
    from asbatch.tracking import sync_run
    from asbatch.tracking.sync import SyncError
    from asbatch.tracking.wandb_run import has_api_key

    total = 0
    todo = [run_dir for run_dir in SweepDir(any_sweep_dir(runs_root, sweep)).runs() if offline_segments(run_dir)]
    if todo and not has_api_key():
        fail(f"no W&B API key (set WANDB_API_KEY or run `wandb login`); {len(todo)} run(s) with offline segments "
             "were not synced", 1)
    for n, run_dir in enumerate(todo, 1):
        def progress(name: str, i: int, count: int, run_dir=run_dir, n=n) -> None:
            click.echo(f"[{n}/{len(todo)}] {run_dir.run_id}: segment {i}/{count} ({name}) ...")

        try:
            done = sync_run(run_dir, timeout_s=timeout_s, on_segment=progress)
        except (SyncError, OSError) as err:
            fail(f"{err}; what was synced before is recorded in {run_dir.wandb_state_file}, run `asbatch sync "
                 f"{sweep}` again", 1)
        total += len(done)
        click.echo(f"[{n}/{len(todo)}] {run_dir.run_id}: synced {len(done)} segment(s)")
    click.echo(f"{total} offline segment(s) synced")

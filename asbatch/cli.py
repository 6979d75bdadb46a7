"""The `asbatch` command line. Thin: parse, call into the library, print."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from asbatch import __version__

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asbatch")
def main() -> None:
    """Train Bayesian neural networks with Adversarial Sampling on Slurm, locally or on a laptop."""


def runs_root_option(f):
    return click.option("--runs-root", type=click.Path(file_okay=False, path_type=Path),
                        default=lambda: os.environ.get("ASBATCH_RUNS", "runs"),
                        show_default="$ASBATCH_RUNS or ./runs", help="where run dirs live")(f)


def load_plan_or_exit(path: Path):
    """Expand a spec (or a one-run config); bad input: one message naming the field, exit code 2."""
    from asbatch.spec import SpecError, load_plan

    try:
        return load_plan(path)
    except SpecError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


def check_stages_or_exit(sweep, stages: tuple[str, ...], spec_path: Path) -> None:
    """--stage names must be stages of the spec (exit code 2 otherwise)."""
    unknown = set(stages) - {s.name for s in sweep.stages}
    if unknown:
        click.echo(f"error: --stage {sorted(unknown)[0]!r} is not a stage of {spec_path} "
                   f"({', '.join(s.name for s in sweep.stages)})", err=True)
        sys.exit(2)


@main.command("run")
@click.argument("spec_path", metavar="CONFIG_OR_SPEC", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@runs_root_option
@click.option("--stage", "stages", multiple=True, help="only these stages (default: all, in order)")
def run_command(spec_path: Path, runs_root: Path, stages: tuple[str, ...]) -> None:
    """Run every run of a spec (or one run's config) in this process, stage by stage.

    Finished runs are skipped, interrupted ones resume. Under torchrun / srun every process runs this
    command and the runs train with DDP.
    """
    from rich.console import Console

    from asbatch.results import run_table
    from asbatch.train import train

    sweep = load_plan_or_exit(spec_path)
    check_stages_or_exit(sweep, stages, spec_path)
    results = []
    for stage in sweep.stages:
        if stages and stage.name not in stages:
            continue
        for run in stage.runs:
            results.append(train(run.config, runs_root / sweep.name / run.run_id, progress_bar=True))
    if int(os.environ.get("RANK", "0")) == 0:
        Console(width=max(Console().width, 130)).print(run_table([r for r in results if r["config"]["model"]["bayesian"]],
                                  title=f"{sweep.name}: Bayesian runs (accuracy in %)"))


# ------------------------------------------------------------------------------------------ launch


def _launch_error(err: Exception) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(1)


def _sweep_dir(runs_root: Path, sweep: str) -> Path:
    path = Path(sweep)
    if (path / "manifest.json").exists():  # a sweep dir given as a path
        return path
    sweep_dir = runs_root / sweep
    if not (sweep_dir / "manifest.json").exists():
        from asbatch.launch import list_sweeps

        known = ", ".join(p.name for p in list_sweeps(runs_root)) or "none"
        click.echo(f"error: no submitted sweep {sweep!r} under {runs_root} (sweeps there: {known})", err=True)
        sys.exit(2)
    return sweep_dir


def _console():
    from rich.console import Console

    return Console(width=max(Console().width, 120))


@main.command("submit")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--executor", type=click.Choice(["auto", "slurm", "local", "debug"]), default="auto", show_default=True,
              help="slurm: job arrays via sbatch; local: one background process; debug: in this process; "
                   "auto: slurm where sbatch exists, else local")
@click.option("--dry-run", is_flag=True, help="print the runs and the sbatch parameters; submit nothing")
@click.option("--stage", "stages", multiple=True, help="only these stages (default: all)")
@runs_root_option
def submit_command(spec_path: Path, executor: str, dry_run: bool, stages: tuple[str, ...], runs_root: Path) -> None:
    """Submit a spec: one job array per stage, each after its upstream stages (afterok).

    Finished runs (results.json) and runs already queued or running are skipped, so submitting a spec
    again submits only what is missing. Returns at once; follow with `asbatch status SWEEP`.
    """
    from asbatch.launch import LaunchError, submit

    sweep = load_plan_or_exit(spec_path)
    check_stages_or_exit(sweep, stages, spec_path)
    try:
        manifest = submit(sweep, runs_root, executor=executor, stages=stages or None, dry_run=dry_run,
                          spec_path=spec_path)
    except LaunchError as err:
        _launch_error(err)
    console = _console()
    if dry_run:
        _print_dry_run(console, sweep, manifest)
        return
    subs = manifest.submitted
    kind = subs[0].executor if subs else executor
    console.print(f"sweep [bold]{sweep.name}[/] ({spec_path}) -> {manifest.sweep_dir}  [executor: {kind}]")
    for sub in subs:
        skipped = f", {len(sub.skipped)} skipped ({_why(sub.skipped)})" if sub.skipped else ""
        if not sub.run_ids:
            console.print(f"  stage {sub.stage}: nothing to submit{skipped}")
            continue
        after = f", after {sub.dependency}" if sub.dependency else ""
        what = "array" if kind == "slurm" else "job"
        one_job = len(set(sub.job_ids)) == 1
        logs = f"{sub.log_dir}/{sub.job_ids[0] if one_job else sub.array_job_id + '_<task>'}/"
        console.print(f"  stage {sub.stage}: {what} {sub.array_job_id}, {len(sub.run_ids)} runs{skipped}{after}; "
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
    subs = {s.stage: s for s in manifest.submitted}
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
        console.print(f"[bold]stage {sub.stage}[/]: {len(sub.run_ids)} runs to submit "
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

    from asbatch.launch import LaunchError, list_sweeps, sweep_status

    console = _console()
    try:
        if sweep is None:
            table = Table(title=f"sweeps under {runs_root}")
            for col in ("sweep", "runs", "states"):
                table.add_column(col)
            for sweep_dir in list_sweeps(runs_root):
                st = sweep_status(sweep_dir)
                counts = ", ".join(f"{n} {s}" for s, n in sorted(st.counts().items()))
                table.add_row(st.sweep, str(len(st.runs)), counts)
            console.print(table)
            return
        st = sweep_status(_sweep_dir(runs_root, sweep))
    except LaunchError as err:
        _launch_error(err)
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
@click.option("--task", default=0, show_default=True, help="task (rank) of a multi-task job")
@runs_root_option
def logs_command(run_id: str, sweep: str | None, stderr: bool, task: int, runs_root: Path) -> None:
    """Print the stdout (or stderr) of RUN_ID's latest job."""
    from asbatch.launch import Manifest, list_sweeps, log_paths

    sweep_dirs = [_sweep_dir(runs_root, sweep)] if sweep else list_sweeps(runs_root)
    found = [(d, rec) for d in sweep_dirs if (rec := Manifest.load(d).latest().get(run_id))]
    if not found:
        click.echo(f"error: run {run_id!r} was not submitted from {runs_root}"
                   f"{' in sweep ' + sweep if sweep else ''}", err=True)
        sys.exit(2)
    if len(found) > 1:
        click.echo(f"error: run {run_id!r} is in several sweeps ({', '.join(d.name for d, _ in found)}); "
                   "name one with --sweep", err=True)
        sys.exit(2)
    sweep_dir, record = found[0]
    out, err = log_paths(sweep_dir, record["job_id"], task)
    path = err if stderr else out
    if not path.exists():
        click.echo(f"no log yet at {path} (job {record['job_id']} has not started?)", err=True)
        sys.exit(1)
    click.echo(f"==> {path} <==", err=True)
    click.echo(path.read_text(errors="replace"), nl=False)


@main.command("cancel")
@click.argument("sweep")
@runs_root_option
def cancel_command(sweep: str, runs_root: Path) -> None:
    """Cancel SWEEP's queued and running jobs (runs keep their checkpoints; `retry` resumes them)."""
    from asbatch.launch import LaunchError, cancel

    try:
        cancelled = cancel(_sweep_dir(runs_root, sweep))
    except LaunchError as err:
        _launch_error(err)
    click.echo(f"cancelled {', '.join(cancelled)}" if cancelled else "nothing to cancel: no queued or running jobs")


@main.command("retry")
@click.argument("sweep")
@click.option("--executor", type=click.Choice(["auto", "slurm", "local", "debug"]), default=None,
              help="default: the executor the sweep was last submitted with")
@runs_root_option
def retry_command(sweep: str, executor: str | None, runs_root: Path) -> None:
    """Resubmit SWEEP's failed, cancelled, timed-out, node-failed and out-of-memory runs (and runs stuck
    behind a failed upstream), one array per stage again; they resume from their checkpoints."""
    from asbatch.launch import LaunchError, retry

    try:
        manifest = retry(_sweep_dir(runs_root, sweep), executor=executor)
    except LaunchError as err:
        _launch_error(err)
    subs = [s for s in manifest.submitted if s.run_ids]
    if not subs:
        click.echo("nothing to retry: no failed, cancelled or timed-out runs")
        return
    for sub in subs:
        after = f", after {sub.dependency}" if sub.dependency else ""
        click.echo(f"stage {sub.stage}: resubmitted {len(sub.run_ids)} runs as {sub.array_job_id}{after}")


# ------------------------------------------------------------------------------------------ analysis


def _run_dirs_of(runs_root: Path, sweep: str) -> Path:
    """A sweep's dir (submitted or run in-process) by name under the runs root, or given as a path."""
    for candidate in (Path(sweep), runs_root / sweep):
        if candidate.is_dir() and candidate != Path("."):
            return candidate
    click.echo(f"error: no sweep {sweep!r} under {runs_root}", err=True)
    sys.exit(2)


@main.command("table")
@click.argument("sweep")
@click.option("--source", type=click.Choice(["local", "wandb"]), default="local", show_default=True,
              help="read run dirs, or the W&B API (runs grouped by sweep)")
@click.option("--format", "fmt", type=click.Choice(["md", "latex", "csv", "html"]), default="md", show_default=True)
@click.option("--wandb-path", default=None, help="ENTITY/PROJECT (default: from the runs' tracking config)")
@runs_root_option
def table_command(sweep: str, source: str, fmt: str, wandb_path: str | None, runs_root: Path) -> None:
    """Print the paper's tables for a sweep: lowest / highest / ensembled accuracy, accuracy on the 20-80%
    most certain data, calibration and OOD columns; mean +- std over seeds, AS rows bold where they win."""
    from asbatch.results import describe, load_records, sweep_tables

    sweep_dir = runs_root / sweep if source == "wandb" else _run_dirs_of(runs_root, sweep)
    records = load_records(sweep_dir, source=source, wandb_path=wandb_path)
    click.echo(describe(records), err=True)
    if not records:
        sys.exit(1)
    click.echo(sweep_tables(records, fmt=fmt), nl=False)


@main.command("report")
@click.argument("sweep")
@click.option("--wandb/--no-wandb", "to_wandb", default=None,
              help="also save a W&B Report (default: when W&B is online, i.e. an API key and a route to it)")
@runs_root_option
def report_command(sweep: str, to_wandb: bool | None, runs_root: Path) -> None:
    """Write the sweep's report (tables + plots) as report.md / report.html with PNGs into <sweep>/report/,
    and, when W&B is online, save a W&B Report with the tables and panels over the sweep's runs."""
    from asbatch.plots import build_static_report
    from asbatch.results import load_records, sweep_tables
    from asbatch.tracking import resolve_mode

    sweep_dir = _run_dirs_of(runs_root, sweep)
    click.echo(build_static_report(sweep_dir))
    if to_wandb is None:
        to_wandb = resolve_mode("auto") == "online"
    if not to_wandb:
        click.echo("W&B offline: no W&B Report saved (run `asbatch report --wandb` where W&B is online)", err=True)
        return
    from asbatch.wandb_report import build_wandb_report

    tracking = _tracking_of(sweep_dir)
    records = load_records(sweep_dir)
    report = build_wandb_report(sweep_dir.name, tracking.get("project", "asbatch"), tracking.get("entity"),
                                sweep_tables(records, fmt="md"))
    click.echo(report.save().url)


def _tracking_of(sweep_dir: Path) -> dict:
    """The tracking section of any finished run of the sweep (project and entity of its W&B runs)."""
    import json

    for results in sorted(sweep_dir.glob("*/results.json")):
        return json.loads(results.read_text())["config"]["tracking"]
    return {}


@main.command("sync")
@click.argument("sweep")
@runs_root_option
def sync_command(sweep: str, runs_root: Path) -> None:
    """Upload a sweep's offline W&B runs (from a login node with internet); each run's segments are synced
    in order into its one W&B id, and what was synced is recorded in <run dir>/wandb.json."""
    from asbatch.tracking import offline_segments, sync_run

    total = 0
    for run_dir in sorted(p for p in _run_dirs_of(runs_root, sweep).iterdir() if p.is_dir()):
        if offline_segments(run_dir):
            done = sync_run(run_dir)
            total += len(done)
            click.echo(f"{run_dir.name}: synced {len(done)} segment(s)")
    click.echo(f"{total} offline segment(s) synced")


@main.group("data")
def data_group() -> None:
    """Data sets: download on a login node with internet; compute nodes read them from the data root."""


@data_group.command("download")
@click.argument("name", type=click.Choice(["cifar10", "cifar100", "svhn"]))
@click.option("--root", type=click.Path(file_okay=False), default=None, help="data root (default $ASBATCH_DATA or ./data)")
def data_download_command(name: str, root: str | None) -> None:
    """Download a data set in torchvision's format into the data root."""
    from asbatch.data import download

    click.echo(f"{name} is in {download(name, root)}")


@main.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench_command(ctx: click.Context) -> None:
    """Run the benchmarks (`python -m benchmarks` in the source checkout; --quick, --markdown PATH, ...)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    if not (repo / "benchmarks" / "__main__.py").is_file():
        click.echo("error: benchmarks/ ships with the source checkout, not with an installed package", err=True)
        sys.exit(2)
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks", *ctx.args], cwd=repo))

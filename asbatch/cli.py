"""The `asbatch` command line. Thin: parse, call into the library, print."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from asbatch import __version__

# Commands whose issue has not landed yet. They say so and exit 2 rather than pretend to work.
PLANNED = {
    "submit": "expand a job spec into Slurm job arrays and submit them",
    "status": "show the state of a sweep's runs",
    "logs": "print a run's logs",
    "cancel": "cancel a sweep's queued and running jobs",
    "retry": "resubmit a sweep's failed or cancelled runs",
    "sync": "sync a sweep's offline W&B runs",
    "table": "print the paper's tables for a sweep",
    "report": "build a W&B report (or static page) for a sweep",
    "data": "download data sets to a data root",
    "bench": "run the benchmarks",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asbatch")
def main() -> None:
    """Train Bayesian neural networks with Adversarial Sampling on Slurm, locally or on a laptop."""


def _planned(name: str, summary: str) -> click.Command:
    @click.command(
        name=name,
        help=f"{summary[0].upper()}{summary[1:]}. (not yet implemented)",
        short_help=f"{summary} (not yet implemented)",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def command() -> None:
        raise click.UsageError(f"'asbatch {name}' is not yet implemented")

    return command


for _name, _summary in PLANNED.items():
    main.add_command(_planned(_name, _summary))


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
    unknown = set(stages) - {s.name for s in sweep.stages}
    if unknown:
        click.echo(f"error: --stage {sorted(unknown)[0]!r} is not a stage of {spec_path} "
                   f"({', '.join(s.name for s in sweep.stages)})", err=True)
        sys.exit(2)
    results = []
    for stage in sweep.stages:
        if stages and stage.name not in stages:
            continue
        for run in stage.runs:
            results.append(train(run.config, runs_root / sweep.name / run.run_id, progress_bar=True))
    if int(os.environ.get("RANK", "0")) == 0:
        Console(width=max(Console().width, 130)).print(run_table([r for r in results if r["config"]["model"]["bayesian"]],
                                  title=f"{sweep.name}: Bayesian runs (accuracy in %)"))

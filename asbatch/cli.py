"""The `asbatch` command line. Thin: parse, call into the library, print."""

from __future__ import annotations

import click

from asbatch import __version__

# Commands whose issue has not landed yet. They say so and exit 2 rather than pretend to work.
PLANNED = {
    "submit": "expand a job spec into Slurm job arrays and submit them",
    "run": "run one config or spec in this process (CPU or GPUs)",
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

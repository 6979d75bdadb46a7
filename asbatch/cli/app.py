"""The `asbatch` command group (the commands register themselves in their modules)."""

from __future__ import annotations

import click

from asbatch import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asbatch")
def main() -> None:
    """Train Bayesian neural networks with Adversarial Sampling on Slurm, locally or on a laptop."""

"""`asbatch data download` and `asbatch bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from asbatch.cli.app import main
from asbatch.names import DOWNLOADABLE


@main.group("data", short_help="Download data sets (on a login node with internet).")
def data_group() -> None:
    """Data sets: download on a login node with internet; compute nodes read them from the data root."""


@data_group.command("download", short_help="Download a data set into the data root.")
@click.argument("name", type=click.Choice(DOWNLOADABLE))
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="data root (default $ASBATCH_DATA or ./data)")
def data_download_command(name: str, root: str | None) -> None:
    """Download a data set in torchvision's format into the data root."""
    from asbatch.cli.app import error_line
    from asbatch.data import download
    from asbatch.datafiles import resolve_root

    try:
        click.echo(f"{name} is in {download(name, root)}")
    except Exception as err:  # noqa: BLE001 - no network, a proxy, a full disk, a corrupt archive: one line
        reason = " ".join(str(getattr(err, "reason", None) or err).split())
        error_line(f"cannot download {name} into {resolve_root(root)}: {type(err).__name__}: {reason} (download "
                   "where there is internet, or copy the files into the data root)", 1)


def benchmarks_checkout() -> Path | None:
    """The source checkout holding `benchmarks/` (an installed package has none)."""
    repo = Path(__file__).resolve().parents[2]
    return repo if (repo / "benchmarks" / "__main__.py").is_file() else None


NO_CHECKOUT = ("the benchmarks ship with the source checkout, not with an installed package: clone the repository "
               "and run `asbatch bench` (or `python -m benchmarks`) there")


@main.command("bench", short_help="Run the benchmarks (in a source checkout).", add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench_command(ctx: click.Context) -> None:
    """Run the benchmarks of a source checkout: `python -m benchmarks ARGS` (see `asbatch bench --help`)."""
    import subprocess

    repo = benchmarks_checkout()
    wants_help = any(arg in ("-h", "--help") for arg in ctx.args)
    if repo is None:
        if wants_help:
            click.echo(f"Usage: asbatch bench [ARGS]...\n\n  {NO_CHECKOUT}.")
            return
        click.echo(f"error: {NO_CHECKOUT}", err=True)
        sys.exit(2)
    if wants_help:
        click.echo(f"asbatch bench [ARGS] runs `python -m benchmarks [ARGS]` in {repo}:\n")
        sys.stdout.flush()
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks", *ctx.args], cwd=repo))

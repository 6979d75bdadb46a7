"""`asbatch data download` and `asbatch bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from asbatch.cli.app import main
from asbatch.names import DOWNLOADABLE


@main.group("data")
def data_group() -> None:
    """Data sets: download on a login node with internet; compute nodes read them from the data root."""


@data_group.command("download")
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


@main.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench_command(ctx: click.Context) -> None:
    """Run the benchmarks (`python -m benchmarks` in the source checkout; --quick, --markdown PATH, ...)."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    if not (repo / "benchmarks" / "__main__.py").is_file():
        click.echo("error: benchmarks/ ships with the source checkout, not with an installed package", err=True)
        sys.exit(2)
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks", *ctx.args], cwd=repo))

"""The `asbatch` command line. Thin: parse, call into the library, print one-line errors."""

from asbatch.cli import analysis, doctor, launch, run, show, tools, watch  # noqa: F401 - importing registers the commands
from asbatch.cli.app import main

__all__ = ["main"]

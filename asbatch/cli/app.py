"""The `asbatch` command group and its error convention (the commands register themselves in their modules).

Whatever goes wrong, the user sees one line `error: ...` (red on a terminal) and an exit code: 2 for bad
input (a spec, a command-line argument, a damaged state file: nothing was submitted or written), 1 for a
failure at run time. `ASBATCH_DEBUG=1` shows the traceback as well.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Any

import click

from asbatch import __version__

DEBUG_ENV = "ASBATCH_DEBUG"


class BadInput(Exception):
    """A user mistake found before anything was done: exit 2."""


def one_line(err: BaseException | str, limit: int = 2000) -> str:
    """The message on one line (a few library errors span lines); a foreign exception says its type."""
    text = " ".join(str(err).split())
    if isinstance(err, BaseException) and not (type(err).__module__.startswith("asbatch") or isinstance(err, OSError)):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_line(message: str, code: int) -> None:
    """Print `error: <message>` on stderr and exit with `code`."""
    click.echo(f"{click.style('error:', fg='red', bold=True)} {one_line(message)}", err=True)
    sys.exit(code)


_BAD_INPUT = {"BadInput", "SpecError", "RunDirError", "DamagedStateError"}  # by name: importing them costs time


def is_bad_input(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:  # a name given on the command line
        return True
    return any(c.__name__ in _BAD_INPUT and c.__module__.startswith("asbatch") for c in type(err).__mro__)


class App(click.Group):
    """A click group whose usage errors and uncaught exceptions are one `error:` line (see the module doc)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            self._main(args, prog_name, complete_var, **extra)
        except SystemExit as done:
            _leave(done.code)

    def _main(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> None:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # `asbatch` alone: the help, as click prints it
            click.echo(err.format_message())
            sys.exit(2)
        except click.ClickException as err:  # usage errors: bad option, missing argument, no such file
            command = f" (see: {err.ctx.command_path} --help)" if getattr(err, "ctx", None) else ""
            error_line(f"{err.format_message()}{command}", err.exit_code)
        except (click.Abort, KeyboardInterrupt):
            error_line("interrupted", 130)
        except BrokenPipeError:
            sys.exit(1)
        except Exception as err:  # noqa: BLE001 - the one place every failure becomes one line
            if os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
                traceback.print_exc()
            error_line(err, 2 if is_bad_input(err) else 1)
        sys.exit(code if isinstance(code, int) else 0)


def _leave(code: int | str | None) -> None:
    """Exit with `code`; a rank of a multi-process run (torchrun, srun) without the interpreter's teardown,
    where gloo's threads now and then abort it (see asbatch.train.run.leave_now)."""
    if "torch.distributed" not in sys.modules:  # no process group could exist: exit as any command does
        sys.exit(code)
    from asbatch.launch.task import several_ranks
    from asbatch.train.run import leave_now

    if several_ranks():
        if isinstance(code, str):
            print(code, file=sys.stderr)
        leave_now(code if isinstance(code, int) else 0 if code is None else 1)
    sys.exit(code)


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asbatch")
def main() -> None:
    """Train Bayesian neural networks with Adversarial Sampling on Slurm, locally or on a laptop.

    Errors are one `error:` line; exit code 2 means bad input (nothing was submitted or written), 1 a failure
    at run time. Set ASBATCH_DEBUG=1 to see the traceback.

    Shell completion of commands, options, sweep names and run ids (bash; zsh_source / fish_source for zsh /
    fish): eval "$(_ASBATCH_COMPLETE=bash_source asbatch)".
    """

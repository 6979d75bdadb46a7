"""Driving the `asbatch` command line in tests as a user would, and reading its one-line errors."""

from __future__ import annotations

import os
import re
import select
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from asbatch.cli import main


def invoke(*args: str | Path, env: dict | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def rejected(result: Result, *expected: str, code: int = 2) -> str:
    """The single error line of a rejected command (asserting exit code, one line, no traceback)."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def on_terminal(args: list[str], env: dict[str, str], timeout_s: float = 120) -> tuple[int, str, list[str]]:
    """`python -m asbatch ARGS` on a pseudo-terminal: its exit code, everything it drew (escape sequences
    removed) and the screen's lines (each redraw of a bar is a line)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.execve(sys.executable, [sys.executable, "-m", "asbatch", *args], env)  # noqa: S606
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        assert ready, f"no output for {timeout_s:.0f} s"
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    screen = [line for chunk in text.split("\n") for line in chunk.split("\r") if line.strip()]
    return os.waitstatus_to_exitcode(status), text, screen

"""Driving the `asbatch` command line in tests as a user would, and reading its one-line errors."""

from __future__ import annotations

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

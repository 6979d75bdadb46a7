"""The command line: help, version, and honest 'not yet implemented' commands."""

from click.testing import CliRunner

from asbatch import __version__
from asbatch.cli import PLANNED, main


def test_help_lists_every_planned_command_group():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ["submit", "run", "status", "logs", "cancel", "retry", "sync", "table", "report"]:
        assert f"  {name} " in result.output


def test_version_prints_the_package_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"asbatch, version {__version__}"


def test_launch_commands_are_implemented():
    for name in ["submit", "status", "logs", "cancel", "retry"]:
        assert name not in PLANNED
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "not yet implemented" not in result.output, name


def test_unimplemented_commands_exit_2_and_say_so():
    for name in PLANNED:
        result = CliRunner().invoke(main, [name, "anything"])
        assert result.exit_code == 2, name
        assert "not yet implemented" in result.output, name

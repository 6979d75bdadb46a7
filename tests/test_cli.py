"""The command line: help, version, every command implemented, bad input exits 2."""

from click.testing import CliRunner

from asbatch import __version__
from asbatch.cli import main


def test_help_lists_every_planned_command_group():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ["submit", "run", "status", "logs", "cancel", "retry", "sync", "table", "report"]:
        assert f"  {name} " in result.output


def test_version_prints_the_package_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"asbatch, version {__version__}"


def test_every_command_is_implemented():
    for name in ["submit", "run", "status", "logs", "cancel", "retry", "sync", "table", "report", "data", "bench"]:
        assert name in main.commands, name
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "not yet implemented" not in result.output, name


def test_run_with_a_bad_config_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: s\nmodel: {name: resnet21}\n")
    result = CliRunner().invoke(main, ["run", str(bad), "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert "model.name" in result.output and "resnet21" in result.output
    assert not (tmp_path / "runs").exists()

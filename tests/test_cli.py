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


def test_the_command_list_shows_whole_short_helps_at_80_columns():
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    listed = result.output.split("Commands:")[1].strip().splitlines()
    assert len(listed) == len(main.commands)
    for line in listed:
        name, text = line.split(maxsplit=1)
        assert text == main.commands[name].short_help, line
        assert len(line) <= 80 and not text.endswith("...") and text.endswith("."), line


def test_bench_help_shows_the_benchmark_options_from_a_checkout_and_says_when_there_is_none(monkeypatch):
    import subprocess
    import sys

    from asbatch.cli import tools

    out = subprocess.run([sys.executable, "-m", "asbatch", "bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--quick", "--markdown PATH", "--only N", "--threads THREADS"):
        assert option in out.stdout, out.stdout
    monkeypatch.setattr(tools, "benchmarks_checkout", lambda: None)
    help_text = CliRunner().invoke(main, ["bench", "--help"])
    assert help_text.exit_code == 0 and "ship with the source checkout" in help_text.output
    refused = CliRunner().invoke(main, ["bench", "--quick"])
    assert refused.exit_code == 2 and refused.output.startswith("error: the benchmarks ship with the source checkout")


def test_shell_completion_offers_sweep_names_and_run_ids(tmp_path):
    for sweep, run_id in (("quick", "train-0123456789"), ("other", "train-abcdefabcd")):
        (tmp_path / sweep / run_id).mkdir(parents=True)
        (tmp_path / sweep / run_id / "config.yaml").write_text("stage: train\n")

    def complete(*words: str) -> list[str]:
        env = {"_ASBATCH_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(["asbatch", *words]),
               "COMP_CWORD": str(len(words)), "ASBATCH_RUNS": str(tmp_path)}
        result = CliRunner().invoke(main, [], env=env, prog_name="asbatch")
        return [line.split(",", 1)[1] for line in result.output.splitlines()]

    assert complete("status", "q") == ["quick"]
    for command in ("wait", "table", "report", "cancel", "retry", "sync"):
        assert complete(command, "") == ["other", "quick"], command
    assert complete("status", "--runs-root", str(tmp_path), "o") == ["other"]
    assert complete("logs", "train-a") == ["train-abcdefabcd"]

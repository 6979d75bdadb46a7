"""A full disk (ENOSPC) while a run writes its files, for real on a small tmpfs: one error line naming the file,
the previous checkpoint and every complete metrics line intact, and after freeing space the same command
resumes and ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asbatch.fsutil import append_line, atomic_write_bytes

CONFIG = {"sweep": "full", "cpu": True, "checkpoint_every": 4,
          "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 320},
          "model": {"name": "mlp", "width": 64, "init_sigma": 0.01}, "schedule": {"name": "cosine", "epochs": 3},
          "adversarial": {"lam": 0.8, "steps": 2}, "eval": {"num_samples": 2}}


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path` (root only; under CI=true a failure to mount fails the test)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int) -> None:
    """Fill the file system of `directory` until about `leave` bytes are free."""
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with (directory / "filler").open("wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_a_write_that_fills_the_disk_leaves_the_file_as_it_was_and_names_it(tmp_path):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        metrics, result = fs / "metrics.jsonl", fs / "results.json"
        append_line(metrics, json.dumps({"epoch": 0}))
        result.write_text("old")
        fill(fs, leave=2048)
        with pytest.raises(OSError) as err:
            append_line(metrics, json.dumps({"epoch": 1, "pad": "x" * 20_000}))
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(metrics)
        assert metrics.read_text() == '{"epoch": 0}\n'  # no partial line
        with pytest.raises(OSError) as err:
            atomic_write_bytes(result, lambda f: f.write(b"y" * 20_000))
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(result)
        assert result.read_text() == "old" and not list(fs.glob(".*.part"))


def asbatch_run(config_path: Path, runs: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ASBATCH_FAULT"}
    return subprocess.run([sys.executable, "-m", "asbatch", "run", str(config_path), "--runs-root", str(runs)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_a_run_that_fills_the_disk_fails_in_one_line_and_resumes_bitwise_after_space_is_freed(tmp_path):
    from test_resume import assert_identical, outcome

    from asbatch.train.checkpoint import load_latest

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    assert asbatch_run(config, tmp_path / "reference").returncode == 0
    (reference,) = (tmp_path / "reference" / "full").iterdir()
    with tmpfs(tmp_path / "fs", "600k") as fs:  # two checkpoints fit, a third (before pruning) does not
        proc = asbatch_run(config, fs / "runs")
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "No space left on device" in errors[0] and str(fs / "runs") in errors[0], errors[0]
        (run_dir,) = (fs / "runs" / "full").iterdir()
        assert not [p for p in run_dir.rglob("*") if p.name.endswith(".part") or p.name.startswith(".tmp-")]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line)["epoch"] == i for i, line in enumerate(lines))
        ckpt, _, _ = load_latest(run_dir / "checkpoints", rank=0)  # the previous checkpoint is whole
        assert "No space left on device" in json.loads((run_dir / "failure.json").read_text())["error"]
        subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)  # space freed
        resumed = asbatch_run(config, fs / "runs")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        step = int(ckpt.name.removeprefix("step-"))  # it went on from the checkpoint the full disk left
        assert f"(global step {step})" in resumed.stdout or f"after step {step % 5}/5" in resumed.stdout, resumed.stdout
        assert_identical(run_dir, outcome(reference))


def test_a_full_disk_at_the_end_of_a_tracked_run_names_the_figure_and_the_rerun_finishes(tmp_path):
    """With W&B offline the run's end writes figures for W&B into the run dir: the one that does not fit is
    named, no half PNG stays, and the same command after freeing space redoes only the final evaluation."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "schedule": {"name": "cosine", "epochs": 1}, "keep_checkpoints": 1,
                                      "checkpoint_every": 10**6, "tracking": {"wandb": "offline", "project": "t"}}))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    with tmpfs(tmp_path / "fs", "350k") as fs:  # the checkpoint and model.pt fit, the figures do not
        proc = subprocess.run([sys.executable, "-m", "asbatch", "run", str(config), "--runs-root", str(fs / "runs")],
                              capture_output=True, text=True, timeout=300, env=env)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "No space left on device" in errors[0] and ".png'" in errors[0], errors[0]
        (run_dir,) = (fs / "runs" / "full").iterdir()
        assert not list(run_dir.glob(".*.part")) and not (run_dir / "results.json").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
        rerun = subprocess.run([sys.executable, "-m", "asbatch", "run", str(config), "--runs-root", str(fs / "runs")],
                               capture_output=True, text=True, timeout=300, env=env)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "final evaluation only" in rerun.stdout and (run_dir / "results.json").exists()

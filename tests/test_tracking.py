"""W&B tracking in real offline mode (WANDB_MODE=offline): one W&B run per training run, id = run id, kept
across a kill + resume, history never logged twice, and no secret written anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from asbatch import tracking
from asbatch.rundir import RunDir, offline_segments
from asbatch.tracking import sync as tracking_sync

CONFIG = {
    "sweep": "tracked", "cpu": True, "checkpoint_every": 4,
    "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 256},
    "model": {"name": "mlp", "width": 16, "init_sigma": 0.01}, "schedule": {"name": "cosine", "epochs": 2},
    "adversarial": {"lam": 0.8}, "eval": {"num_samples": 2},
    "tracking": {"wandb": "offline", "project": "asbatch-tests", "tags": ["test"]},
}
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B key; must never reach a file


def run(tmp_path: Path, fault: str = "") -> int:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "ASBATCH_FAULT": fault,
           "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "asbatch", "run", str(path), "--runs-root", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


@pytest.mark.slow
def test_offline_run_keeps_its_id_across_a_kill_and_writes_no_secret(tmp_path):
    assert run(tmp_path, "step:5") == -signal.SIGKILL  # 4 steps per epoch: killed in epoch 2
    assert run(tmp_path) == 0
    (run_dir,) = (tmp_path / "runs" / "tracked").iterdir()
    run_id = run_dir.name
    segments = offline_segments(RunDir(run_dir))
    assert len(segments) == 2, "one offline segment per process"
    assert all(s.name.endswith(f"-{run_id}") for s in segments), [s.name for s in segments]
    state = json.loads((run_dir / "wandb.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert state["id"] == run_id and state["mode"] == "offline"
    assert state["last_step"] == results["train"]["global_steps"] == 8
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), f"API key written to {path}"


def test_auto_mode_is_offline_without_a_key_and_env_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert tracking.resolve_mode("auto") == "offline"
    assert tracking.resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("online") == "disabled"


def test_auto_mode_with_a_key_but_no_network_is_offline(monkeypatch):
    # This machine has no route to api.wandb.ai: the real connection attempt fails, nothing is mocked.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking.can_reach("api.wandb.ai", timeout=1.0) is False
    assert tracking.resolve_mode("auto") == "offline"


def test_netrc_with_a_wandb_entry_counts_as_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password x\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracking.has_api_key()


def test_sync_uploads_segments_in_order_into_one_id_and_records_them(tmp_path, monkeypatch):
    """Stand-in for the W&B server (none can run here): `wandb sync` is replaced by a recorder, so this
    checks the commands we issue and the bookkeeping, not the upload itself."""
    run_dir = tmp_path / "run"
    for name in ("offline-run-20261125_100000-train-abc", "offline-run-20261125_090000-train-abc"):
        (run_dir / "wandb" / name).mkdir(parents=True)
    (run_dir / "wandb.json").write_text(json.dumps({"id": "train-abc", "project": "p", "entity": None,
                                                    "last_step": 8}))
    calls = []
    monkeypatch.setattr(tracking_sync.subprocess, "run", lambda cmd, check: calls.append(cmd))

    assert tracking.sync_run(run_dir) == ["offline-run-20261125_090000-train-abc",
                                          "offline-run-20261125_100000-train-abc"]
    assert [c[-1].rsplit("/", 1)[-1] for c in calls] == ["offline-run-20261125_090000-train-abc",
                                                         "offline-run-20261125_100000-train-abc"]
    assert "--append" not in calls[0] and "--append" in calls[1]
    assert all(c[c.index("--id") + 1] == "train-abc" for c in calls)
    assert tracking.sync_run(run_dir) == [], "synced segments are not uploaded twice"


def test_a_resumed_segment_does_not_log_a_step_again(tmp_path):
    """The W&B run object is a recorder here (its binary offline log has no reader in this wandb version)."""
    from asbatch.config import RunConfig

    class Recorder:
        logged: ClassVar[list] = []

        def log(self, row, step):
            self.logged.append(step)

    config = RunConfig.model_validate({k: v for k, v in CONFIG.items() if k != "tracking"})
    (tmp_path / "wandb.json").write_text(json.dumps({"last_step": 4}))  # left by a killed segment
    tracker = tracking.Tracker(config, tmp_path)
    tracker.run = Recorder()
    for step in (4, 8):  # the resumed segment re-runs epoch 1 (ending at step 4), then epoch 2
        tracker.log_epoch({"epoch": step // 4 - 1}, step=step)
    assert tracker.run.logged == [8]
    assert json.loads((tmp_path / "wandb.json").read_text())["last_step"] == 8

"""Checkpoints carry the SHA-256 of their files: changed bytes are skipped for the previous checkpoint, a
planted pickle runs nothing, and a run whose checkpoints are all damaged never starts over on its own."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from asbatch.train.checkpoint import COMPLETE, NoValidCheckpointError, load_latest, save


def write(root, step: int, value: float) -> None:
    shared = {"model": {"w": torch.full((64,), value)}, "progress": {"epoch": step}}
    save(root, step, shared, {"torch": torch.get_rng_state()}, rank=0, world_size=1, barrier=lambda: None,
         keep=5)


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def replace_with_other(path) -> None:  # a whole, loadable checkpoint file, but not the one written here
    torch.save({"model": {"w": torch.zeros(64)}, "progress": {"epoch": 99}}, path)


@pytest.mark.parametrize("damage", [flip_byte, truncate, replace_with_other], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", ["shared.pt", "rank0.pt"])
def test_a_checkpoint_whose_bytes_changed_is_skipped_for_the_previous_one(tmp_path, damage, name):
    write(tmp_path, 10, 1.0)
    write(tmp_path, 20, 2.0)
    newest = tmp_path / "step-000000020"
    damage(newest / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt, shared, _ = load_latest(tmp_path, rank=0)
    assert ckpt.name == "step-000000010" and torch.equal(shared["model"]["w"], torch.full((64,), 1.0))
    (warning,) = [str(w.message) for w in caught]
    assert warning.startswith(f"skipping checkpoint {newest}: ")
    if damage is not truncate or name == "rank0.pt":
        assert f"{name}: its bytes changed since it was written" in warning


class Planted:
    """A pickle that would create a file when unpickled, if unpickling ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_runs_nothing_even_with_a_matching_checksum(tmp_path):
    write(tmp_path, 10, 1.0)
    write(tmp_path, 20, 2.0)
    newest, marker = tmp_path / "step-000000020", tmp_path / "ran"
    (newest / "shared.pt").write_bytes(pickle.dumps({"model": Planted(marker)}))
    record = json.loads((newest / COMPLETE).read_text())
    import hashlib

    record["sha256"]["shared.pt"] = hashlib.sha256((newest / "shared.pt").read_bytes()).hexdigest()
    (newest / COMPLETE).write_text(json.dumps(record))  # whoever planted it fixed the checksum too
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-000000020"):
        ckpt, _, _ = load_latest(tmp_path, rank=0)
    assert ckpt.name == "step-000000010" and not marker.exists()


def test_when_every_checkpoint_is_damaged_the_run_does_not_start_over(tmp_path):
    write(tmp_path, 10, 1.0)
    write(tmp_path, 20, 2.0)
    flip_byte(tmp_path / "step-000000010" / "shared.pt")
    (tmp_path / "step-000000020" / COMPLETE).write_text("{not json")
    with warnings.catch_warnings(), pytest.raises(NoValidCheckpointError) as err:
        warnings.simplefilter("ignore")
        load_latest(tmp_path, rank=0)
    message = str(err.value)
    assert "step-000000020 (COMPLETE is damaged" in message
    assert "step-000000010 (shared.pt: its bytes changed" in message
    assert f"move {tmp_path} away to train it afresh" in message and "\n" not in message
    assert load_latest(tmp_path / "none", rank=0) is None  # no checkpoint at all: a fresh run, no error


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    write(tmp_path, 10, 1.0)
    marker = tmp_path / "step-000000010" / COMPLETE
    marker.write_text(json.dumps({"step": 10, "world_size": 1}))
    _, shared, rank_state = load_latest(tmp_path, rank=0)
    assert shared["progress"] == {"epoch": 10} and rank_state is not None


CONFIG = {"sweep": "integrity", "cpu": True, "checkpoint_every": 4,
          "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 320},
          "model": {"name": "mlp", "width": 16, "init_sigma": 0.01}, "schedule": {"name": "cosine", "epochs": 2},
          "adversarial": {"lam": 0.8, "steps": 2}, "eval": {"num_samples": 2}}


def asbatch_run(config_path, runs, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASBATCH_FAULT": fault} if fault else {k: v for k, v in os.environ.items()
                                                                   if k != "ASBATCH_FAULT"}
    return subprocess.run([sys.executable, "-m", "asbatch", "run", str(config_path), "--runs-root", str(runs)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_a_run_whose_checkpoints_are_all_damaged_fails_in_one_line_and_keeps_its_files(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert asbatch_run(path, tmp_path / "runs", "step:9").returncode == -signal.SIGKILL  # 5 steps an epoch
    (run_dir,) = (tmp_path / "runs" / "integrity").iterdir()
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-000000005", "step-000000008"]  # epoch 1's end, step 8
    for ckpt in checkpoints:
        flip_byte(ckpt / "shared.pt")
    proc = asbatch_run(path, tmp_path / "runs")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no valid checkpoint" in errors[0] and "step-000000008" in errors[0] and "step-000000005" in errors[0]
    # nothing started over: the same two (damaged) checkpoints, no results, the failure recorded for `status`
    assert sorted((run_dir / "checkpoints").glob("step-*")) == checkpoints
    assert not (run_dir / "results.json").exists()
    assert "NoValidCheckpointError" in (run_dir / "failure.json").read_text()

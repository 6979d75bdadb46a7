"""Exact resume: a run SIGKILLed at any point and restarted ends bitwise identical to an uninterrupted run.

Each run is a real `python -m asbatch run` process; `ASBATCH_FAULT=<point>:<step>` makes it SIGKILL itself at
that point (after an optimizer step, inside a checkpoint write between the rank files and the COMPLETE
marker, or right after an epoch-end checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

# 512 digits / batch 64 = 8 steps per epoch, 3 epochs = 24 steps; checkpoints every 5 steps + each epoch end
CONFIG = {
    "sweep": "resume", "cpu": True, "checkpoint_every": 5, "keep_checkpoints": 2,
    "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 512},
    "model": {"name": "mlp", "width": 32, "init_sigma": 0.01},
    "optim": {"lr": 0.003}, "schedule": {"name": "cosine", "epochs": 3},
    "adversarial": {"lam": 0.8}, "eval": {"num_samples": 3},
}
TIMING_FIELDS = {"images_per_s", "step_time_s"}
# The reference variant with the reference's config values: its run-long eps-gradient accumulator is in the
# checkpoints, BatchNorm (VGG11) sees every pass, Adam is reset at each epoch start.
REFERENCE_CONFIG = {
    **CONFIG, "sweep": "resume_reference",
    "model": {"name": "vgg11", "width": 4, "init_log_sigma": -3.0, "mu_init": "uniform_fan_in",
              "bn_weight_init": "uniform"},
    "optim": {"lr": 0.003, "reset_each_epoch": True},
    "adversarial": {"lam": 0.8, "variant": "reference"},
}


def run(config_path: Path, runs_root: Path, fault: str | None = None) -> int:
    env = {**os.environ, "ASBATCH_FAULT": fault or ""}
    proc = subprocess.run([sys.executable, "-m", "asbatch", "run", str(config_path), "--runs-root", str(runs_root)],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def outcome(run_dir: Path) -> tuple[dict, dict, list]:
    model = torch.load(run_dir / "model.pt", weights_only=True)
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("timing")
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return model, results, metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert run(path, root / "runs") == 0
    (run_dir,) = (root / "runs" / "resume").iterdir()
    return outcome(run_dir)


def assert_identical(run_dir: Path, reference) -> None:
    model, results, metrics = outcome(run_dir)
    ref_model, ref_results, ref_metrics = reference
    assert model.keys() == ref_model.keys()
    for key in model:
        assert torch.equal(model[key], ref_model[key]), f"parameter {key} differs"
    assert results == ref_results
    assert metrics == ref_metrics


@pytest.mark.parametrize("faults", [
    ["step:3"],                     # before the first checkpoint: starts over
    ["step:7"],                     # mid-epoch, after the step-5 checkpoint
    ["checkpoint:10"],              # inside a checkpoint write (rank file written, no COMPLETE marker)
    ["epoch:2"],                    # right after an epoch-end checkpoint
    ["step:7", "checkpoint:15", "step:22"],  # killed three times
], ids=lambda f: "+".join(f))
def test_killed_and_restarted_run_is_bitwise_identical(tmp_path, reference, faults):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    for fault in faults:
        assert run(path, tmp_path / "runs", fault) == -signal.SIGKILL, f"{fault} did not fire"
    (run_dir,) = (tmp_path / "runs" / "resume").iterdir()
    assert not (run_dir / "results.json").exists()
    assert run(path, tmp_path / "runs") == 0
    assert_identical(run_dir, reference)


@pytest.fixture(scope="module")
def reference_variant(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_variant")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(REFERENCE_CONFIG))
    assert run(path, root / "runs") == 0
    (run_dir,) = (root / "runs" / "resume_reference").iterdir()
    return outcome(run_dir)


def test_reference_variant_killed_mid_epoch_and_at_an_epoch_end_resumes_bitwise_identical(tmp_path,
                                                                                         reference_variant):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(REFERENCE_CONFIG))
    for fault in ("step:7", "epoch:2"):  # after the step-5 checkpoint (memory mid-run); before an Adam reset
        assert run(path, tmp_path / "runs", fault) == -signal.SIGKILL, f"{fault} did not fire"
    (run_dir,) = (tmp_path / "runs" / "resume_reference").iterdir()
    assert run(path, tmp_path / "runs") == 0
    assert_identical(run_dir, reference_variant)
    metrics = reference_variant[2]
    assert all(0.0 <= m["train_acc_adv"] <= 1.0 and m["train_acc_adv"] != m["train_acc"] for m in metrics)


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, reference):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert run(path, tmp_path / "runs", "step:12") == -signal.SIGKILL
    (run_dir,) = (tmp_path / "runs" / "resume").iterdir()
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    (newest / "shared.pt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "asbatch", "run", str(path), "--runs-root", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipping checkpoint {newest}" in proc.stderr
    assert_identical(run_dir, reference)


def test_a_killed_fp16_run_resumes_bitwise_identical_with_its_grad_scaler(tmp_path):
    config = {**CONFIG, "precision": "fp16", "schedule": {"name": "cosine", "epochs": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run(path, tmp_path / "reference") == 0
    assert run(path, tmp_path / "runs", "step:11") == -signal.SIGKILL  # after the step-10 checkpoint
    assert run(path, tmp_path / "runs") == 0
    (reference,) = (tmp_path / "reference" / "resume").iterdir()
    (resumed,) = (tmp_path / "runs" / "resume").iterdir()
    assert_identical(resumed, outcome(reference))
    assert json.loads((resumed / "results.json").read_text())["train"]["precision"] == "fp16"

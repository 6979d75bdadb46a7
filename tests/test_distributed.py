"""Real 2-process training under torchrun on CPU: Accelerator(cpu=True) gives a gloo group, DDP keeps ranks
identical, and the result equals one process on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

BASE = {
    "sweep": "ddp", "cpu": True,
    "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 512},
    "model": {"name": "mlp", "width": 32, "init_sigma": 0.01},
    "optim": {"lr": 0.003}, "schedule": {"name": "cosine", "epochs": 2}, "eval": {"num_samples": 2},
}


def launch(tmp_path: Path, config: dict, nproc: int) -> Path:
    path = tmp_path / f"config-{nproc}.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = tmp_path / f"runs-{nproc}"
    cmd = [sys.executable, "-m", "asbatch", "run", str(path), "--runs-root", str(runs)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "asbatch", "run", str(path), "--runs-root", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (runs / "ddp").iterdir()
    return run_dir


def test_two_process_deterministic_training_equals_one_process_on_the_same_global_batch(tmp_path):
    config = {**BASE, "model": {"name": "mlp", "width": 32, "bayesian": False}, "adversarial": {"lam": 0.0}}
    single, double = launch(tmp_path, config, 1), launch(tmp_path, config, 2)
    results = json.loads((double / "results.json").read_text())
    assert results["train"]["world_size"] == 2 and results["train"]["ranks_in_sync"]
    a = torch.load(single / "model.pt", weights_only=True)
    b = torch.load(double / "model.pt", weights_only=True)
    for key in a:  # only the order of float sums differs (all-reduce of two halves vs one batch)
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-4), key


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_two_process_bayesian_as_training_keeps_ranks_identical(tmp_path, variant):
    config = {**BASE, "optim": {"lr": 0.02}, "adversarial": {"lam": 0.8, "variant": variant},
              "schedule": {"name": "cosine", "epochs": 6}}
    run_dir = launch(tmp_path, config, 2)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["world_size"] == 2
    assert results["train"]["ranks_in_sync"] is True
    # measured over seeds 0 and 1: accuracy 0.900 to 0.908 (paper), 0.908 to 0.917 (reference), NLL 0.26 to 0.30
    ev = results["evaluation"]
    assert ev["ensemble_accuracy"] >= 0.85 and ev["nll"] < 0.5, ev
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6  # only rank 0 writes

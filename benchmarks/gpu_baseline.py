"""Row G7 (`python -m benchmarks --gpu`): AS training images/s through the real `Trainer`, this code against an
older source tree, on the same GPU in the same call: the GPU road's H100 goal (ResNet20 bf16 AS images/s
>= 3x the code before the flat posterior, commit 15e4833).

Each tree trains in its own subprocess (its own `asbatch` first on PYTHONPATH): a Bayesian ResNet20, bf16,
batch 128, N = 5, lambda 0.8, on CIFAR-shaped files written for the purpose (random pixels: the rate does
not depend on them); one warm-up epoch, then a timed epoch of STEPS steps, the device synchronised around
it. The older tree is a directory holding its `asbatch` package, named by ASBATCH_BASELINE. The device
machine gets a copy of the working tree without git history, so make it here first (an untracked,
non-ignored directory travels with the tree):

    mkdir -p baseline-15e4833 && git archive 15e4833 asbatch | tar -x -C baseline-15e4833
    ASBATCH_BASELINE=baseline-15e4833 python -m benchmarks --gpu
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Row, skipped

BASELINE_ENV = "ASBATCH_BASELINE"
STEPS = 20
GOAL = 3.0

# Only API both trees have: RunConfig's keys, Trainer(config, RunDir), run_epoch, prog.
_SCRIPT = """
import json, sys, tempfile, time
from pathlib import Path
import torch
from asbatch.config import RunConfig
from asbatch.rundir import RunDir
from asbatch.train.trainer import Trainer

root, device, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = RunConfig.model_validate({
    "sweep": "g7", "cpu": device == "cpu", "precision": "bf16", "checkpoint_every": 10**9,
    "data": {"name": "cifar10", "root": root, "batch_size": 128, "train_subset": 128 * steps, "test_subset": 128},
    "model": {"name": "resnet20", "bayesian": True}, "schedule": {"name": "cosine", "epochs": 3},
    "adversarial": {"lam": 0.8, "steps": 5, "alpha": 0.02}})
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(config, RunDir(Path(tmp) / config.run_id))
    trainer.run_epoch(None, None)  # warm-up: cuDNN's autotuning, the allocator, the optimizer state
    trainer.prog.epoch += 1
    trainer.prog.step_in_epoch = 0
    sync()
    start = time.perf_counter()
    trainer.run_epoch(None, None)
    sync()
    seconds = time.perf_counter() - start
print(json.dumps({"images_per_s": 128 * steps / seconds, "asbatch": __import__("asbatch").__file__}))
"""


def write_cifar_shaped(root: Path, images: int) -> None:
    """CIFAR-10 files in torchvision's layout with random pixels (the fake writer the tests use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.cifar_fixtures import write_fake_cifar10

    write_fake_cifar10(root, n_train_per_batch=-(-images // 5), n_test=128)


def trainer_rate(source: Path | None, data_root: Path, device: str, steps: int = STEPS) -> dict:
    """{"images_per_s", "asbatch"} of an AS training epoch of the tree at `source` (None: this checkout)."""
    tree = Path(source).resolve() if source is not None else Path(__file__).resolve().parents[1]
    inherited = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), inherited] if inherited else [str(tree)]),
           "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(data_root), device, str(steps)], env=env,
                          capture_output=True, text=True, timeout=1800, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"G7 with {source or 'this checkout'}: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, device: str = "cuda") -> list[Row]:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return [skipped("G7. AS training images/s through the Trainer: this code / baseline", "-",
                        "no CUDA device visible")]
    steps = 10 if quick else STEPS
    baseline = os.environ.get(BASELINE_ENV)
    with tempfile.TemporaryDirectory(prefix="asbatch-g7-") as tmp:
        write_cifar_shaped(Path(tmp), 128 * steps)
        now = trainer_rate(None, Path(tmp), device, steps)
        if not baseline:
            return [Row("G7. AS training images/s through the Trainer, ResNet20, bf16", now["images_per_s"],
                        "images/s", f">= {GOAL}x the baseline", None,
                        f"no baseline: set {BASELINE_ENV} to an older tree (see benchmarks/gpu_baseline.py)")]
        old = trainer_rate(Path(baseline), Path(tmp), device, steps)
    ratio = now["images_per_s"] / old["images_per_s"]
    return [Row("G7. AS training images/s through the Trainer, ResNet20, bf16: this code / baseline", ratio, "x",
                f">= {GOAL}x", ratio >= GOAL,
                f"this code {now['images_per_s']:,.0f} img/s, baseline {old['images_per_s']:,.0f} img/s "
                f"({old['asbatch']}); batch 128, N = 5, {steps} timed steps on {device}")]

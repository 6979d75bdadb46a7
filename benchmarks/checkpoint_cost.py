"""Row 6: cost of one periodic checkpoint relative to the training time between two of them.

One save is what train.py writes every `RunConfig.checkpoint_every` optimizer steps: `asbatch.train.checkpoint.save`
of the model state, Adam state, scheduler and progress (shared.pt) plus the RNG states (rank0.pt), fsynced
and renamed into place; single process (barrier = no-op). The time between saves is checkpoint_every AS steps.
The temp dir is on the same file system as /tmp; a run dir on a network file system will differ.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from asbatch.config import RunConfig
from asbatch.train import Progress, checkpoint
from asbatch.train.setup import rng_state
from benchmarks.common import LAM, Row, bayesian_resnet20, cifar_batch, median
from benchmarks.step_time import training_step

GOAL = 0.02


def _trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A Bayesian ResNet20 with a populated Adam state (exp_avg, exp_avg_sq), as mid-training."""
    model = bayesian_resnet20()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x, y = cifar_batch()
    training_step(model, opt, x, y, 0.0)
    return model, opt, sched


def measure_as_step(quick: bool) -> float:
    model = bayesian_resnet20()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = cifar_batch()
    times = []
    for _ in range(2 if quick else 4):
        start = time.perf_counter()
        training_step(model, opt, x, y, LAM)
        times.append(time.perf_counter() - start)
    return median(times[1:])


def run(quick: bool = False, as_step_s: float | None = None) -> Row:
    every = RunConfig().checkpoint_every
    if as_step_s is None:  # normally row 1's median is passed in
        as_step_s = measure_as_step(quick)
    model, opt, sched = _trained_state()
    eps_gen = torch.Generator().manual_seed(0)
    times, size = [], 0
    with tempfile.TemporaryDirectory(prefix="asbatch-bench-ckpt-") as tmp:
        root = Path(tmp)
        for step in range(1, (4 if quick else 8) + 1):
            start = time.perf_counter()
            # what train.py's save_checkpoint builds, including the state_dict() copies
            shared = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "progress": asdict(Progress(global_step=step * every)), "scaler": None}
            final = checkpoint.save(root, step * every, shared, rng_state(eps_gen), rank=0, world_size=1,
                                    barrier=lambda: None, keep=2)
            times.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in final.iterdir())
    save_s = median(times)
    fraction = save_s / (every * as_step_s)
    note = (f"save {save_s * 1e3:.0f} ms (median of {len(times)}, {size / 1e6:.1f} MB) every {every} steps x "
            f"{as_step_s:.2f} s per AS step (CPU); the goal holds while an AS step takes >= "
            f"{save_s / (every * GOAL) * 1e3:.0f} ms (a fast GPU may step faster)")
    return Row("6. checkpoint save / training between saves", 100 * fraction, "%", f"<= {100 * GOAL:.0f}%",
               fraction <= GOAL, note)

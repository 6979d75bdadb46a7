"""Row 1: one AS training step (lambda = 0.8, N = 5) against one plain Bayes-by-backprop step (lambda = 0).

Both contenders are complete optimizer steps (as_step + Adam step + zero_grad) of a Bayesian ResNet20 on a
batch of 100 CIFAR-shaped images; each has its own copy of the model and its own optimizer.
"""

from __future__ import annotations

import torch

from asbatch.adversarial import as_step
from benchmarks.common import (
    ALPHA,
    KL_WEIGHT,
    LAM,
    STEPS,
    Row,
    bayesian_resnet20,
    cifar_batch,
    interleaved,
    twin,
)

GOAL = float(STEPS + 1)  # the method's floor: N + 1 forward + backward passes against 1


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  lam: float) -> None:
    as_step(model, x, y, lam=lam, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT)
    opt.step()
    opt.zero_grad(set_to_none=True)


def adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer training uses (asbatch.train.setup.make_optimizer): Adam, fused."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)


def as_step_seconds(rounds: int = 3) -> float:
    """Median time of one AS training step at batch 100 (for rows that need it when row 1 did not run)."""
    x, y = cifar_batch()
    model = bayesian_resnet20()
    opt = adam(model)
    times = interleaved({"as": lambda: training_step(model, opt, x, y, LAM)}, rounds=rounds)
    return times.median("as")


def run(quick: bool = False) -> Row:
    x, y = cifar_batch()
    base = bayesian_resnet20()
    models = {"as": base, "plain": twin(base)}
    opts = {k: adam(m) for k, m in models.items()}
    # several plain steps per round: one is short (~0.35 s on one thread), so a single hiccup would dominate its time
    plain_reps = 3

    def as_contender() -> None:
        training_step(models["as"], opts["as"], x, y, LAM)

    def plain_contender() -> None:
        for _ in range(plain_reps):
            training_step(models["plain"], opts["plain"], x, y, 0.0)

    times = interleaved({"as": as_contender, "plain": plain_contender}, rounds=3 if quick else 9)
    times.per_unit("plain", plain_reps)
    ratio = times.ratio("as", "plain")
    as_s, plain_s = times.median("as"), times.median("plain")
    passes = STEPS + 1  # N - 1 inner passes, the prediction pass (which also gives ascent step 1), the adversarial pass
    note = (f"AS {as_s * 1e3:.0f} ms, plain {plain_s * 1e3:.0f} ms per step; {times.describe('as', 'plain')}. "
            f"AS does {passes} forward+backward passes vs 1, and each inner pass costs a full backward: "
            f"dL/deps = sigma * dL/dw needs dL/dw of every layer")
    return Row("1. AS step / plain ELBO step", ratio, "x", f"<= {GOAL}x", ratio <= GOAL, note,
               extra={"as_step_s": as_s, "plain_step_s": plain_s})

"""Row 15: an AS step with `speed.channels_last` (conv weights and activations in NHWC memory order) against
the usual NCHW one, fp32 and bf16, on this machine's CPU.

Both contenders are complete optimizer steps (as_step + fused Adam step) of a Bayesian ResNet20 on a batch of
100 CIFAR-shaped images, eager, each with its own copy of the model; the channels_last one is
`asbatch.models.to_channels_last` of its copy, fed batches in NHWC order (as the trainer's loader makes them).
A GPU's tensor cores are what channels_last is for under bf16 / fp16: `python -m benchmarks --gpu` row G5
measures it there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import ALPHA, KL_WEIGHT, LAM, STEPS, Row, bayesian_resnet20, cifar_batch, interleaved, twin
from benchmarks.step_time import adam


def run(quick: bool = False) -> list[Row]:
    from asbatch.models import to_channels_last
    from asbatch.train.setup import autocast_forward

    x, y = cifar_batch()
    inputs = {"nchw": x, "nhwc": x.contiguous(memory_format=torch.channels_last)}
    rows = []
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        nchw = bayesian_resnet20()
        models = {name: autocast_forward(m, torch.device("cpu"), dtype) for name, m in
                  (("nchw", nchw), ("nhwc", to_channels_last(twin(nchw))))}
        times = interleaved({name: _stepper(model, inputs[name], y) for name, model in models.items()},
                            rounds=3 if quick else 7)
        note = (f"NCHW {times.median('nchw') * 1e3:.0f} ms, channels_last {times.median('nhwc') * 1e3:.0f} ms per "
                f"AS step (batch 100, CPU, eager); {times.describe('nchw', 'nhwc')}")
        rows.append(Row(f"15. AS step, {precision}: NCHW / channels_last (speedup)", times.ratio("nchw", "nhwc"),
                        "x", "- (info)", None, note))
    return rows


def _stepper(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One AS training step of `model` on (x, y) per call, with its own fused Adam."""
    from asbatch.adversarial import as_step

    opt = adam(model)

    def step() -> None:
        as_step(model, x, y, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step

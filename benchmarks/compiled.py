"""Row 13: an AS step of the compiled model (`speed.compile: true`) against the eager one, and the compile time.

Both contenders are complete optimizer steps (as_step + fused Adam step) of a Bayesian ResNet20 on a batch of
100 CIFAR-shaped images, each with its own copy of the model. The compiled one is `torch.compile(model)`, used
for the outer and the inner passes as the trainer does; its first steps compile (timed apart: the one-off cost
a run pays), the timed rounds reuse the graphs. On a CPU inductor emits C++ kernels; on a GPU, Triton ones
(`python -m benchmarks --gpu` row G5 measures that).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import ALPHA, KL_WEIGHT, LAM, STEPS, Row, bayesian_resnet20, cifar_batch, interleaved, twin
from benchmarks.step_time import adam


def run(quick: bool = False) -> Row:
    from asbatch.adversarial import as_step

    torch._dynamo.reset()
    x, y = cifar_batch()
    eager = bayesian_resnet20()
    plain = twin(eager)
    compiled = torch.compile(plain)
    opts = {"eager": adam(eager), "compiled": adam(plain)}

    def step(model: torch.nn.Module, name: str) -> None:
        as_step(model, x, y, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT, inner_model=model)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(2):  # compiles the prediction, inner and adversarial passes' graphs
        step(compiled, "compiled")
    compile_s = time.perf_counter() - start
    times = interleaved({"eager": lambda: step(eager, "eager"), "compiled": lambda: step(compiled, "compiled")},
                        rounds=3 if quick else 7)
    speedup = times.ratio("eager", "compiled")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    note = (f"eager {times.median('eager') * 1e3:.0f} ms, compiled {times.median('compiled') * 1e3:.0f} ms per AS "
            f"step (batch 100, CPU); {times.describe('eager', 'compiled')}; compiling took {compile_s:.0f} s "
            f"(the first 2 steps, {graphs} graphs), paid once per run")
    return Row("13. AS step: eager / compiled (speedup)", speedup, "x", "- (info)", None, note)

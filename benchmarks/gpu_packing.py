"""Row G6 (`python -m benchmarks --gpu`): K AS training runs packed onto one GPU, each in its own process,
as `resources.runs_per_task: K` and `asbatch run --jobs K` run them; aggregate images/s against K = 1, with
and without a job-private MPS daemon (`resources.mps`).

Every process trains a Bayesian ResNet20 (bf16, batch 128, N = 5, fused Adam; `gpu.images_per_s`, the same
step the trainer runs); all start their timed steps together (a barrier) and the aggregate is the sum of
their rates. The issue's goal: K = 4 at >= 2.5x the images/s of K = 1.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import torch

from benchmarks.common import Row, skipped

GOAL_K, GOAL = 4, 2.5


def _one(steps: int, device: str, barrier: Any, out: Any) -> None:
    from benchmarks.gpu import images_per_s

    images_per_s("resnet20", False, 2, torch.device(device))  # warm up (cuDNN autotuning, allocator)
    barrier.wait()
    rate, _ = images_per_s("resnet20", False, steps, torch.device(device))
    out.put(rate)


def packed_rate(k: int, steps: int, device: str = "cuda") -> float:
    """Aggregate AS images/s of `k` processes training at once on `device`."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_one, args=(steps, device, barrier, out)) for _ in range(k)]
    for proc in procs:
        proc.start()
    rates = [out.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(rates)


def run(quick: bool = False) -> list[Row]:
    if not torch.cuda.is_available():
        return [skipped("G6. packed runs on one GPU: aggregate images/s", "-", "no CUDA device visible")]
    from asbatch.launch.mps import mps_daemon

    steps = 10 if quick else 30
    ks = (1, 2, 4) if quick else (1, 2, 4, 8)
    alone = packed_rate(1, steps)
    rows = []
    for k in ks[1:]:
        rate = packed_rate(k, steps)
        rows.append(Row(f"G6. {k} packed ResNet20 AS runs on one GPU / 1 run (images/s)", rate / alone, "x",
                        f">= {GOAL}" if k == GOAL_K else "-", rate / alone >= GOAL if k == GOAL_K else None,
                        f"{rate:,.0f} img/s in all, {rate / k:,.0f} per run; one run alone {alone:,.0f} img/s"))
    try:
        with mps_daemon():
            rate = packed_rate(GOAL_K, steps)
        rows.append(Row(f"G6. {GOAL_K} packed runs with MPS / 1 run (images/s)", rate / alone, "x", f">= {GOAL}",
                        rate / alone >= GOAL, f"{rate:,.0f} img/s in all, job-private MPS daemon"))
    except RuntimeError as err:  # no MPS tools on this machine, or the GPU's compute mode forbids it
        rows.append(skipped(f"G6. {GOAL_K} packed runs with MPS", f">= {GOAL}", str(err)))
    return rows

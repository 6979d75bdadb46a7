"""Rows 8-9: how well an ascent step follows the current gradient, by sign.

Row 8 (reference variant): the reference code adds every eps gradient of a run into one accumulator G and
steps by sign(G). Its first ascent step of batch k moves along sign(G_{k-1} + g_k), where g_k = d(-CE)/deps at
eps_0 of batch k; the paper's moves along sign(g_k). Measured while a Bayesian ResNet20 trains with the
reference variant (Adam, lr 1e-3) on fresh CIFAR-shaped batches: the fraction of eps entries (with g != 0)
where the two signs agree, after 1, 5 and 20 batches. 100 % at batch 1 by construction; 50 % is chance.

Row 9 (precision): under bf16 autocast, the fraction of ascent-gradient signs at eps_0 that equal the fp32
ones (Bayesian ResNet20 at init), and the cost of running the inner passes in fp32 under bf16: AS step time
with `inner_context=full_precision` over AS step time with bf16 inner passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asbatch.adversarial import AscentMemory, adversarial_noise, as_step, reference_as_step
from asbatch.bayes import frozen_bn_stats, sample_noise, set_noise
from asbatch.train.setup import autocast_forward, full_precision
from benchmarks.common import (
    ALPHA,
    BATCH,
    KL_WEIGHT,
    LAM,
    STEPS,
    Row,
    bayesian_resnet20,
    cifar_batch,
    interleaved,
    twin,
)

CHECKPOINTS = (1, 5, 20)


def _ascent_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: list[torch.Tensor]) -> list[torch.Tensor]:
    """d(-CE)/deps at `eps` (train-mode forward, BatchNorm running stats left alone)."""
    leaves = [e.clone().requires_grad_(True) for e in eps]
    set_noise(model, leaves)
    with frozen_bn_stats(model):
        loss = -F.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, leaves))


def _agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Fraction of entries with b != 0 where sign(a) == sign(b)."""
    same = total = 0
    for u, v in zip(a, b, strict=True):
        nonzero = v != 0
        same += int((u.sign() == v.sign())[nonzero].sum())
        total += int(nonzero.sum())
    return same / total


def memory_agreement(batches: int) -> dict[int, float]:
    """Sign agreement of the reference variant's first ascent step with the current gradient, by batch."""
    model = bayesian_resnet20()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    memory = AscentMemory.zeros_for(model)
    gen = torch.Generator().manual_seed(0)
    found = {}
    for k in range(1, batches + 1):
        x, y = cifar_batch(BATCH, seed=k)  # a fresh batch each step
        if k in CHECKPOINTS:
            peek = torch.Generator().manual_seed(0)
            peek.set_state(gen.get_state())  # the eps_0 this step will draw
            g = _ascent_grad(model, x, y, sample_noise(model, peek))
            found[k] = _agreement([m + d for m, d in zip(memory.tensors, g, strict=True)], g)
        reference_as_step(model, x, y, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT, memory=memory,
                          generator=gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return found


def run_memory(quick: bool = False) -> Row:
    found = memory_agreement(CHECKPOINTS[-1] if not quick else CHECKPOINTS[1])
    last = max(found)
    text = ", ".join(f"{k} batch{'es' if k > 1 else ''}: {v:.1%}" for k, v in found.items())
    note = (f"first ascent step of the reference variant (sign of the run-long sum G + g) vs the current gradient g "
            f"(the paper's step), Bayesian ResNet20, fresh batch of {BATCH} each step, Adam lr 1e-3: {text}; "
            "50% is chance")
    return Row(f"8. reference ascent sign = current gradient sign, after {last} batches", 100 * found[last], "%",
               "- (info)", None, note, extra={"agreement": found})


def _loss_at(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: list[torch.Tensor]) -> float:
    set_noise(model, eps)
    with torch.no_grad(), frozen_bn_stats(model):
        return F.cross_entropy(model(x), y).item()


def bf16_agreement(seeds: int) -> list[tuple[float, float, float]]:
    """Per model seed (Bayesian ResNet20 at init): (sign agreement of bf16-autocast ascent gradients with fp32
    ones at eps_0; first-order efficiency sum(g * sign(g_bf16)) / sum(|g|) with g the fp32 gradient; the
    fp32 loss increase L(eps_N) - L(eps_0) of a bf16 ascent over that of an fp32 ascent)."""
    out = []
    for seed in range(seeds):
        model = bayesian_resnet20(seed)
        x, y = cifar_batch(BATCH, seed=seed)
        eps = sample_noise(model, torch.Generator().manual_seed(seed))
        fp32 = _ascent_grad(model, x, y, eps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = _ascent_grad(model, x, y, eps)
        first_order = (sum(float((g * h.sign()).sum()) for g, h in zip(fp32, bf16, strict=True))
                       / sum(float(g.abs().sum()) for g in fp32))
        with frozen_bn_stats(model):
            ascent_fp32 = adversarial_noise(model, x, y, eps, STEPS, ALPHA)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ascent_bf16 = adversarial_noise(model, x, y, eps, STEPS, ALPHA)
        start = _loss_at(model, x, y, eps)
        gain = (_loss_at(model, x, y, ascent_bf16) - start) / (_loss_at(model, x, y, ascent_fp32) - start)
        out.append((_agreement(bf16, fp32), first_order, gain))
    return out


def run_bf16(quick: bool = False) -> list[Row]:
    found = bf16_agreement(2 if quick else 4)
    mean = [sum(v[i] for v in found) / len(found) for i in range(3)]
    sign_row = Row("9a. bf16 ascent-gradient sign = fp32 sign", 100 * mean[0], "%", "- (info)", None,
                   f"Bayesian ResNet20 at init, batch of {BATCH}, {len(found)} seeds: sign agreement "
                   f"{', '.join(f'{v[0]:.1%}' for v in found)}; the flipped entries are small ones: a bf16 sign "
                   f"step gets {mean[1]:.1%} of the fp32 step's first-order loss increase, and a bf16 ascent "
                   f"(N = {STEPS}) {mean[2]:.1%} of the fp32 ascent's loss increase L(eps_N) - L(eps_0) "
                   f"(per seed {', '.join(f'{v[2]:.1%}' for v in found)}), losses in fp32",
                   extra={"agreement": found})
    x, y = cifar_batch()
    base = bayesian_resnet20()
    # wrap after copying: a deep copy of a wrapped model would call the original's forward
    models = {k: autocast_forward(m, torch.device("cpu"), torch.bfloat16)
              for k, m in (("fp32 inner", base), ("bf16 inner", twin(base)))}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}

    def step(name: str, inner_context) -> None:
        as_step(models[name], x, y, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT,
                inner_context=inner_context)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    times = interleaved({"fp32 inner": lambda: step("fp32 inner", full_precision),
                         "bf16 inner": lambda: step("bf16 inner", None)}, rounds=3 if quick else 7)
    ratio = times.ratio("fp32 inner", "bf16 inner")
    cost_row = Row("9b. AS step under bf16: fp32 inner passes / bf16 inner passes", ratio, "x", "- (info)", None,
                   f"fp32 inner {times.median('fp32 inner') * 1e3:.0f} ms, bf16 inner "
                   f"{times.median('bf16 inner') * 1e3:.0f} ms per step (N = {STEPS}; with fp32 inner passes the "
                   f"prediction pass no longer gives the first direction: N + 2 passes instead of N + 1); "
                   f"{times.describe('fp32 inner', 'bf16 inner')}; on this CPU (bf16 instructions) as on a "
                   "GPU, a bf16 pass is cheaper than an fp32 one", extra={"ratio": ratio})
    return [sign_row, cost_row]

"""Row 2: asbatch's AS step against the reference design's AS step, on the same Bayesian layers.

`reference_as_step` re-implements the training step of the AS reference code (AISIGSJTU/AS) from its
description (see asbatch/adversarial/reference.py), on asbatch's parametrized layers, so that only the step's
design differs, not the layer implementation. What that design does, and asbatch does not:

  - inner passes call loss.backward(): the parameters' gradients are computed every time and thrown away
    (zero_grad before each), and eps.grad is never zeroed, so step k follows sign(g_1 + ... + g_k); eps are
    persistent buffers, redrawn in place every training step, so their .grad even carries the gradients of
    all earlier training steps;
  - inner passes are ordinary train-mode forwards: BatchNorm running stats are updated on every pass;
  - each forward also returns the KL (the reference layers compute it in forward), graph included;
  - the prediction loss uses fresh eps drawn on every forward call, not eps_0, and carries the KL term,
    so the KL is weighted by (1 - lambda) * beta instead of beta;
  - the adversarial and prediction graphs are held together and back-propagated in one backward;
  - one more forward with fresh eps (its graph built, not under no_grad) produces the reported output.

The reference trains in fp16 on a GPU; here both run in fp32 on the CPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from asbatch.adversarial import as_step
from asbatch.bayes import (
    bayesian_weights,
    get_noise,
    kl_divergence,
    sample_noise,
    set_noise,
    set_noise_mode,
)
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

GOAL = 1.2
SKIP = 1e-7  # the reference skips a loss whose weight is below this
# Loose: the faithful reference's ascent differs by design (accumulated eps.grad), so its L_adv differs;
# the exact check is the formula comparison with accumulation switched off.
SEMANTICS_TOL = 0.2
# The formula check: asbatch takes its first ascent direction from the prediction pass (loss weighted by
# 1 - lambda), the reference from an unweighted inner pass; a gradient entry within rounding of zero can get
# the other sign (1 of 269,722 entries here), and the later passes amplify that into ~1e-4 of L_adv.
FORMULA_TOL = 1e-3


@dataclass
class ReferenceLosses:
    total: torch.Tensor  # (1 - lambda) * (L_pred + beta * KL) + lambda * L_adv
    pred: torch.Tensor
    adv: torch.Tensor
    kl: torch.Tensor
    eps_adv: list[torch.Tensor]  # eps_N, where the adversarial loss was taken


def _forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward as the reference layers do it: logits and the KL, both with their graphs."""
    return model(x), kl_divergence(model)


_EPS_BUFFERS: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()


def _eps_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The model's eps tensors, one per Bayesian weight, requiring grad; created once per model (the
    reference keeps them as buffers; they are not parameters, so zero_grad never clears their .grad)."""
    if model not in _EPS_BUFFERS:
        _EPS_BUFFERS[model] = [torch.zeros_like(g.log_sigma).requires_grad_(True)
                               for _, _, g in bayesian_weights(model)]
    return _EPS_BUFFERS[model]


def reference_as_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    *,
    lam: float,
    steps: int,
    alpha: float,
    kl_weight: float,
    eps0: Sequence[torch.Tensor] | None = None,
    pred_eps: Sequence[torch.Tensor] | None = None,
    accumulate: bool = True,
) -> ReferenceLosses:
    """One training step of the reference design; returns its losses (detached) and eps_N.

    `eps0`: the start of the ascent (default: drawn from N(0, 1)). `pred_eps`: noise for the prediction
    pass; None (the reference's behaviour) draws fresh eps on every forward call. `accumulate=False` clears
    eps.grad after each step (not the reference's behaviour; it isolates that one difference in the
    loss-semantics check). Without `optimizer` the gradients are left in .grad.
    """
    out: dict[str, torch.Tensor] = {"pred": torch.zeros(()), "kl": torch.zeros(()), "adv": torch.zeros(())}
    eps: list[torch.Tensor] = []
    loss = torch.zeros(())
    if lam > SKIP:
        eps = _eps_buffers(model)
        with torch.no_grad():  # redraw in place: the tensors, and their .grad, live on across steps
            for i, e in enumerate(eps):
                if eps0 is not None:
                    e.copy_(eps0[i])
                else:
                    e.normal_()
                if not accumulate:
                    e.grad = None
        set_noise(model, eps)
        for _ in range(steps):
            logits, _ = _forward(model, x)
            model.zero_grad()
            (-F.cross_entropy(logits, y)).backward()  # also fills (and discards) every parameter's grad
            with torch.no_grad():
                for e in eps:
                    e -= alpha * e.grad.sign()  # e.grad: the sum of every gradient so far, all steps
                    if not accumulate:
                        e.grad = None
        logits, _ = _forward(model, x)
        out["adv"] = F.cross_entropy(logits, y)
    if 1 - lam > SKIP:
        if pred_eps is None:
            set_noise_mode(model, "sample")  # every weight access draws new eps
        else:
            set_noise(model, [e.detach() for e in pred_eps])
        logits, kl = _forward(model, x)
        out["pred"], out["kl"] = F.cross_entropy(logits, y), kl
        loss = (1 - lam) * (out["pred"] + kl_weight * kl)
    loss = loss + lam * out["adv"]
    # the reported output: one more forward, fresh noise, graph built and dropped
    set_noise_mode(model, "sample")
    _forward(model, x)
    if optimizer is not None:
        optimizer.zero_grad()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return ReferenceLosses(total=loss.detach(), pred=out["pred"].detach(), adv=out["adv"].detach(),
                           kl=out["kl"].detach(), eps_adv=[e.detach().clone() for e in eps])


def _bn_updates(model: nn.Module) -> int:
    """How many running-stat updates the first BatchNorm has seen."""
    bn = next(m for m in model.modules() if isinstance(m, _BatchNorm))
    return int(bn.num_batches_tracked)


def loss_semantics(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[bool, str]:
    """Run asbatch's step and the reference's from the same weights and the same eps_0; compare the losses.

    Two comparisons. (a) Formula: the reference with eps.grad cleared after each step (the one difference
    in the ascent) must report exactly asbatch's total once the KL weighting difference is removed: the
    reference weights the KL by (1 - lambda) * beta, asbatch by beta. (b) The faithful reference (gradients
    accumulate): L_adv differs because its later steps follow sign(g_1 + ... + g_k), not sign(g_k); that is
    asbatch's intended deviation, so (b) only has to agree within a loose tolerance.
    In both the reference is given eps_0 for its prediction pass too (it would draw fresh noise).
    """
    ours = bayesian_resnet20(seed)
    start = twin(ours)
    bn_before = _bn_updates(ours)
    got = as_step(ours, x, y, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT,
                  generator=torch.Generator().manual_seed(seed))
    eps_ours = [e.detach() for e in get_noise(ours)]
    refs = {}
    for accumulate in (False, True):
        ref = twin(start)
        eps0 = sample_noise(ref, torch.Generator().manual_seed(seed))  # the same draw as_step made
        refs[accumulate] = reference_as_step(ref, x, y, None, lam=LAM, steps=STEPS, alpha=ALPHA,
                                             kl_weight=KL_WEIGHT, eps0=eps0, pred_eps=eps0, accumulate=accumulate)
    want, formula = refs[True], refs[False]
    kl_shift = LAM * KL_WEIGHT * float(got.kl)  # asbatch total - reference total, by the KL weighting alone

    def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
        return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)

    formula_rel = rel(float(got.total) - kl_shift, formula.total)
    faithful_rel = rel(got.total, want.total)
    within_ball = max(float((e - e0).abs().max()) for e, e0 in zip(eps_ours, eps0, strict=True)) <= STEPS * ALPHA + 1e-6
    moved = sum(int((a != b).sum()) for a, b in zip(eps_ours, want.eps_adv, strict=True))
    moved_apart = moved / sum(e.numel() for e in eps0)
    same_pred_kl = max(rel(got.pred, want.pred), rel(got.kl, want.kl))
    ok = formula_rel < FORMULA_TOL and same_pred_kl < 1e-5 and faithful_rel < SEMANTICS_TOL and within_ball
    note = (f"same batch and eps_0: (a) with eps.grad cleared per step the reference's total equals asbatch's "
            f"minus lambda*beta*KL = {kl_shift:.1e} to {formula_rel:.0e}; (b) faithful reference: total "
            f"{float(want.total):.3f} vs asbatch {float(got.total):.3f} (rel diff {faithful_rel:.2f}, tolerance "
            f"{SEMANTICS_TOL}): L_pred and KL equal to {same_pred_kl:.0e}, "
            f"L_adv {float(want.adv):.3f} vs {float(got.adv):.3f} "
            f"because accumulated eps.grad puts {moved_apart:.0%} of eps_N entries elsewhere; BN running-stat "
            f"updates per step: asbatch {_bn_updates(ours) - bn_before}, reference {_bn_updates(ref) - bn_before}")
    return ok, note


def run(quick: bool = False) -> Row:
    x, y = cifar_batch()
    same, semantics = loss_semantics(x, y)
    base = bayesian_resnet20()
    models = {"asbatch": base, "reference": twin(base)}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}

    def ours() -> None:
        as_step(models["asbatch"], x, y, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT)
        opts["asbatch"].step()
        opts["asbatch"].zero_grad(set_to_none=True)

    def reference() -> None:
        reference_as_step(models["reference"], x, y, opts["reference"], lam=LAM, steps=STEPS, alpha=ALPHA,
                          kl_weight=KL_WEIGHT)

    times = interleaved({"asbatch": ours, "reference": reference}, rounds=3 if quick else 7)
    speedup = times.ratio("reference", "asbatch")
    note = (f"reference {times.median('reference') * 1e3:.0f} ms, asbatch {times.median('asbatch') * 1e3:.0f} ms per "
            f"step; {times.describe('reference', 'asbatch')}. Loss semantics {'AGREE' if same else 'DIFFER'}: "
            f"{semantics}")
    return Row("2. reference AS step / asbatch AS step", speedup, "x", f">= {GOAL}x",
               speedup >= GOAL and same, note, extra={"semantics_ok": same})

"""The `reference` variant of the AS training step: what the reference code (AISIGSJTU/AS) does, as it behaves.

Read from its `utils.train`, `model.py` and `models/layers/*.py` (asbatch's own transcription, on asbatch's
parametrized layers). Per batch, with beta the KL weight:
  1. if lambda > 0: eps <- N(0, 1) for every Bayesian weight. eps lives in buffers whose .grad is never
     zeroed during a run (`model.zero_grad()` clears parameters only), so every backward that eps takes part
     in ADDS to one accumulator G per weight, which lives as long as the run:
       N times: a train-mode forward at eps (BatchNorm running stats updated), backward of -CE:
                G += d(-CE)/deps;  eps <- eps - alpha * sign(G)
       a forward at eps_N (BN updated): L_adv = CE(eps_N)
  2. if lambda < 1: a forward with fresh noise, independent of eps_0 (BN updated): L_pred = CE + beta * KL
  3. total = (1 - lambda) * L_pred + lambda * L_adv, so the KL is weighted by (1 - lambda) * beta
  4. one more train-mode forward with fresh noise (BN updated): its accuracy is the reported training accuracy
  5. backward of total: the parameters' gradients, and G += lambda * dCE(eps_N)/deps
After a few batches sign(G) is mostly history: its agreement with the current gradient is measured in
`benchmarks/ascent_sign.py`. `AscentMemory` is G; it belongs in every checkpoint (exact resume).

Kept from asbatch: gradients of the inner passes are taken w.r.t. eps only (the reference computes and
discards parameter gradients: same values), inner passes run on the unwrapped module (no DDP all-reduce),
fp16 inner losses are scaled by `loss_scale` and unscaled before they are added to G, and non-finite
gradient entries add nothing to G (the reference trains in fp32 and has neither).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asbatch.adversarial.paper import ContextFactory, LossScale, StepLosses, posterior_of, scaled_loss
from asbatch.bayes.flat import FlatLayout


class AscentMemory:
    """The reference's eps.grad: one flat fp32 tensor laid out as the model's flat eps (`layout`; per-layer views
    in `tensors`, in `bayesian_weights` order), summed over every backward eps took part in since the run started."""

    def __init__(self, tensors: Sequence[torch.Tensor], layout: FlatLayout | None = None):
        self.layout = layout or FlatLayout([tuple(t.shape) for t in tensors], [False] * len(tensors))
        self.flat = self.layout.flatten([t.detach().float() for t in tensors]) if tensors else torch.zeros(0)

    @classmethod
    def zeros_for(cls, model: nn.Module) -> AscentMemory:
        """An empty memory (as eps.grad before the first backward) for every Bayesian weight of `model`."""
        posterior = posterior_of(model)
        return cls([torch.zeros(s, dtype=torch.float32, device=posterior.mu.device) for s in posterior.shapes],
                   posterior.layout)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.layout.split(self.flat)

    def add(self, grad: torch.Tensor | Sequence[torch.Tensor | None] | None, loss_scale: LossScale = 1.0) -> None:
        """G += grad / loss_scale (a flat grad, or one per weight); missing grads and non-finite entries add
        nothing."""
        if grad is None:
            return
        if not isinstance(grad, torch.Tensor):
            grad = self.layout.flatten([torch.zeros_like(t) if g is None else g
                                        for g, t in zip(grad, self.tensors, strict=True)])
        with torch.no_grad():
            grad = grad.float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            self.flat.add_(grad if isinstance(loss_scale, float) and loss_scale == 1.0 else grad / loss_scale)

    def descend(self, eps: torch.Tensor | Sequence[torch.Tensor], alpha: float) -> torch.Tensor | list[torch.Tensor]:
        """eps - alpha * sign(G) (G holds gradients of -CE: this ascends CE along the run-long sum); a flat eps
        gives a flat result, a list of per-weight eps a list."""
        if isinstance(eps, torch.Tensor):
            return torch.sub(eps.detach(), self.flat.sign(), alpha=alpha)
        return [(e - alpha * m.sign()).detach() for e, m in zip(eps, self.tensors, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": [t.detach().cpu().clone() for t in self.tensors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, own = state["tensors"], self.tensors
        if len(saved) != len(own) or any(s.shape != t.shape for s, t in zip(saved, own, strict=True)):
            raise ValueError("the saved ascent memory does not fit this model's Bayesian weights")
        with torch.no_grad():
            self.flat.copy_(self.layout.flatten(saved))


def reference_as_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    steps: int,
    alpha: float,
    kl_weight: float,
    memory: AscentMemory,
    inner_model: nn.Module | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: ContextFactory = contextlib.nullcontext,
    loss_scale: LossScale = 1.0,
    generator: torch.Generator | None = None,
    inner_context: ContextFactory | None = None,
) -> StepLosses:
    """Forward + backward of one training step as the reference code does it (rules in the module doc).

    Same calling convention as `as_step`, plus `memory`, the run-long accumulator, which it updates. Noise
    is drawn from `generator` in the reference's order: eps_0, the prediction pass, the reporting pass.
    The adversarial and prediction passes are back-propagated one after the other (the reference sums them
    into one backward: the same gradient up to float rounding), the first inside `no_sync()`.
    `pred_logits` are those of the reporting pass (the reference's training accuracy).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if steps < 0 or alpha < 0:
        raise ValueError(f"steps and alpha must be >= 0, got steps={steps}, alpha={alpha}")
    inner = inner_model if inner_model is not None else model
    posterior = posterior_of(inner)
    pred = adv = adv_logits = None
    if lam > 0:
        eps = posterior.draw(generator)
        with inner_context() if inner_context is not None else contextlib.nullcontext(), posterior.frozen():
            for _ in range(steps):  # BatchNorm running stats are updated by every pass, as in the reference
                leaf = eps.requires_grad_(True)
                posterior.hold(leaf)
                (grad,) = torch.autograd.grad(-scaled_loss(F.cross_entropy(inner(x), y), loss_scale), leaf)
                memory.add(grad, loss_scale)
                eps = memory.descend(leaf, alpha)
        leaf = eps.requires_grad_(True)
        posterior.hold(leaf)
        with no_sync() if lam < 1 else contextlib.nullcontext():
            logits = model(x)
            adv = F.cross_entropy(logits, y)
            backward(lam * adv)
        memory.add(leaf.grad, loss_scale)  # eps_N took part in the training backward
        adv_logits = logits.detach()
    if lam < 1:
        posterior.hold(posterior.draw(generator))  # fresh noise, independent of eps_0
        pred = F.cross_entropy(model(x), y)
        kl = posterior.kl()
        backward((1.0 - lam) * (pred + kl_weight * kl))
    else:
        with torch.no_grad():
            kl = posterior.kl()  # reported only: with lambda = 1 the reference has no KL term
    posterior.hold(posterior.draw(generator))
    with torch.no_grad():
        pred_logits = inner(x)  # the reporting pass: train mode, BatchNorm running stats updated
    total = (0.0 if pred is None else (1.0 - lam) * (pred + kl_weight * kl)) + (0.0 if adv is None else lam * adv)
    return StepLosses(
        total=torch.as_tensor(total).detach(),
        pred=None if pred is None else pred.detach(),
        adv=None if adv is None else adv.detach(),
        kl=kl.detach(),
        pred_logits=pred_logits.detach(),
        adv_logits=adv_logits,
    )

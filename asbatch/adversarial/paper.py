"""The `paper` variant of the AS training step: the equations of Zhang et al. (AAAI 2022, eq. 3-6).

    eps_0 ~ N(0, 1);   eps_{k+1} = eps_k + alpha * sign(d L(eps_k) / d eps)   for k < N
    total = (1 - lambda) * L_pred(eps_0) + lambda * L_adv(eps_N) + kl_weight * KL(q || p)

Since w = mu + sigma * eps and sigma > 0, sign(dL/deps) = sign(dL/dw): a step of alpha on eps is the paper's
step of alpha * sigma on w (eq. 5), and ||eps_N - eps_0||_inf <= N * alpha (eq. 6).

How this differs from the reference code (AISIGSJTU/AS; `asbatch.adversarial.reference` reproduces that):
  - each step uses the CURRENT gradient; the reference never zeroes eps.grad during a run, so its steps
    follow a run-long sum of gradients;
  - L_pred is taken at eps_0, where the ascent starts; the KL is weighted by beta (the reference: (1 - lambda) beta);
  - inner passes take gradients w.r.t. eps only (`torch.autograd.grad`): no parameter .grad is touched;
  - inner passes leave BatchNorm running statistics alone (they still normalise with batch statistics);
  - inner passes run on the unwrapped module, so DDP does not all-reduce them.

Cost: the step works on the model's flat posterior (asbatch.bayes.flat): one randn for eps_0, one flat eps
leaf per inner pass (mu and sigma detached, one exp for all inner passes), each ascent step three ops on it,
the KL a few ops on the flat buffers. Per step that is the network's own N + 1 forward / backward passes
plus a few dozen ops, whatever the number of layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from asbatch.bayes import FlatPosterior, flat_posterior, frozen_bn_stats

ContextFactory = Callable[[], contextlib.AbstractContextManager]
LossScale = float | torch.Tensor  # fp16: the grad scaler's scale, a device tensor (reading it would sync)


def _sign_step(eps: torch.Tensor, grad: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """eps + alpha * sign(grad), detached; NaN entries (fp16 overflow) and a missing grad do not move."""
    if grad is None:
        return eps.detach()
    return torch.add(eps.detach(), grad.nan_to_num(nan=0.0).sign(), alpha=alpha)


def ascend(eps: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], alpha: float) -> list[torch.Tensor]:
    """One step eps + alpha * sign(grad) per tensor, detached; NaN entries (fp16 overflow) and missing grads
    do not move. (The training step applies the same rule to the flat eps in one go.)"""
    return [_sign_step(e, g, alpha) for e, g in zip(eps, grads, strict=True)]


def scaled_loss(loss: torch.Tensor, loss_scale: LossScale) -> torch.Tensor:
    return loss if isinstance(loss_scale, float) and loss_scale == 1.0 else loss * loss_scale


def posterior_of(model: nn.Module) -> FlatPosterior:
    """The model's flat posterior; a model not converted by `make_bayesian` cannot take an AS step."""
    posterior = flat_posterior(model)
    if posterior is None:
        raise ValueError("the model has no flat posterior: convert it with asbatch.bayes.make_bayesian")
    return posterior


def _ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int, alpha: float,
            loss_scale: LossScale) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The flat eps_N, and the logits of the first inner pass (at eps_0; None when steps = 0)."""
    posterior, eps, first = posterior_of(model), eps.detach(), None
    with frozen_bn_stats(model), posterior.frozen():
        for _ in range(steps):
            leaf = eps.requires_grad_(True)
            posterior.hold(leaf)
            logits = model(x)
            first = logits.detach() if first is None else first
            (grad,) = torch.autograd.grad(scaled_loss(F.cross_entropy(logits, y), loss_scale), leaf)
            eps = _sign_step(leaf, grad, alpha)
    posterior.hold(eps)
    return eps, first


def adversarial_noise(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps0: Sequence[torch.Tensor],
    steps: int,
    alpha: float,
    loss_scale: LossScale = 1.0,
) -> list[torch.Tensor]:
    """Return eps_N after `steps` sign-gradient ascent steps of size `alpha` from `eps0` (eq. 5, on eps).

    Runs under whatever autocast context the caller is in. `loss_scale` multiplies the inner loss before
    differentiation: under fp16 small gradients underflow to 0 and sign(0) = 0 would freeze eps, while the
    sign ignores any positive scale. Non-finite gradient entries (fp16 overflow) leave their eps unmoved
    (nan -> 0); +-inf keeps its sign, which is the right direction. Model left holding eps_N (mode "fixed").
    """
    if steps < 0 or alpha < 0:
        raise ValueError(f"steps and alpha must be >= 0, got steps={steps}, alpha={alpha}")
    posterior = posterior_of(model)
    _ascent(model, x, y, posterior.flatten([e.detach() for e in eps0]), steps, alpha, loss_scale)
    return list(posterior.eps_list())


@dataclass
class StepLosses:
    """What one training step computed (detached). pred / adv are None where lambda skips them.

    `pred_logits` come from a forward at a fresh posterior sample (the prediction pass, or a pass at eps_0
    where lambda = 1 skips it): their accuracy is `train_acc`, comparable across lambda. `adv_logits` come
    from the adversarial pass at eps_N (None for lambda = 0): their accuracy is `train_acc_adv`.
    """

    total: torch.Tensor
    pred: torch.Tensor | None
    adv: torch.Tensor | None
    kl: torch.Tensor
    pred_logits: torch.Tensor
    adv_logits: torch.Tensor | None


def as_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    steps: int,
    alpha: float,
    kl_weight: float,
    inner_model: nn.Module | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: ContextFactory = contextlib.nullcontext,
    loss_scale: LossScale = 1.0,
    generator: torch.Generator | None = None,
    inner_context: ContextFactory | None = None,
) -> StepLosses:
    """Forward + backward of one AS training step; leaves the mixed-loss gradient in the parameters' .grad.

    `model` is what trains (possibly DDP-wrapped); `inner_model` is the same net unwrapped (default: `model`)
    for the inner passes. The two outer passes are back-propagated one after the other (same gradient as the
    sum, one graph in memory at a time): the first inside `no_sync()` so DDP all-reduces once, at the second.
    Pass `backward=accelerator.backward` and `no_sync=lambda: accelerator.no_sync(model)` under Accelerate.
    `inner_context`, if given, is entered around the inner ascent passes (e.g. full precision under bf16
    autocast); the prediction pass, which runs outside it, then no longer provides the first direction.

    lambda = 0 is exactly a plain Bayes-by-backprop step: one forward, no inner passes. lambda = 1 skips L_pred.
    For 0 < lambda < 1 the prediction pass also provides the first ascent direction (eps_0 requires grad in
    it), so a step costs N + 1 forward/backward passes, not N + 2; the result is the same.
    The optimizer step and zero_grad are the caller's. Nothing here reads a device value (no host sync).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    inner = inner_model if inner_model is not None else model
    posterior = posterior_of(inner)
    eps0 = posterior.draw(generator)

    def outer_pass(eps: torch.Tensor, weight: float, last: bool):
        """A training forward + backward of weight * CE at `eps`; the last one adds the KL and syncs DDP.
        Returns CE, the logits, the KL (last pass) and the loss it back-propagated (detached)."""
        posterior.hold(eps)
        with contextlib.nullcontext() if last else no_sync():
            logits = model(x)
            ce = F.cross_entropy(logits, y)
            kl = posterior.kl() if last else None
            loss = weight * ce + kl_weight * kl if last else weight * ce
            backward(loss)
        return ce, logits.detach(), kl, loss.detach()

    pred = adv = pred_logits = adv_logits = None
    start, ascent_steps = eps0, steps
    if lam < 1:
        # With eps_0 as a leaf, the prediction pass's backward also yields dL/deps at eps_0 (the train-mode
        # forward normalises with batch statistics, as the inner passes do): the first ascent step for free.
        reuse = lam > 0 and steps > 0 and inner_context is None
        pred, pred_logits, kl, total = outer_pass(eps0.requires_grad_(reuse), 1.0 - lam, last=lam == 0)
        if reuse:
            start, ascent_steps = _sign_step(eps0, eps0.grad, alpha), steps - 1
    if lam > 0:
        with inner_context() if inner_context is not None else contextlib.nullcontext():
            eps_adv, first_logits = _ascent(inner, x, y, start, ascent_steps, alpha, loss_scale)
        if pred_logits is None:  # lambda = 1: the training accuracy at eps_0, from the first inner pass
            pred_logits = first_logits if first_logits is not None else _logits_at(inner, x, eps0)
        adv, adv_logits, kl, adv_loss = outer_pass(eps_adv, lam, last=True)
        total = adv_loss if pred is None else total + adv_loss  # (1 - lambda) L_pred + lambda L_adv + beta KL
    return StepLosses(
        total=total,
        pred=None if pred is None else pred.detach(),
        adv=None if adv is None else adv.detach(),
        kl=kl.detach(),
        pred_logits=pred_logits,
        adv_logits=adv_logits,
    )


@torch.no_grad()
def _logits_at(model: nn.Module, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A train-mode forward at the flat `eps` that leaves BatchNorm running statistics alone."""
    posterior_of(model).hold(eps)
    with frozen_bn_stats(model):
        return model(x)

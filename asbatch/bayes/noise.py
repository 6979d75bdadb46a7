"""Model-wide operations on Bayesian weights: convert, sample / fix / read / perturb eps, KL, BN freezing.

A model made Bayesian by `make_bayesian` keeps its posterior flat (asbatch.bayes.flat): the Bayesian
weights are found once, at conversion, and these functions work on the flat tensors (one randn, one cat,
a few ops for the KL) while their arguments and results stay per layer. A model whose GaussianWeight
parametrizations were registered by hand is walked layer by layer (`bayesian_weights` finds them by type,
so any module with parametrized `weight` / `bias` takes part; nothing checks class names).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from asbatch.bayes.flat import FlatPosterior, flat_posterior
from asbatch.bayes.gaussian import NOISE_MODES, GaussianWeight, NoiseMode

BAYESIAN_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def make_bayesian(
    model: nn.Module,
    init_sigma: float = 0.15,
    prior_sigma: float = 0.15,
    layer_types: tuple[type[nn.Module], ...] = BAYESIAN_LAYER_TYPES,
    init_log_sigma: float | None = None,
) -> nn.Module:
    """Turn `model` into its Bayesian twin in place: mu <- current weights, sigma <- init_sigma (or
    log sigma <- init_log_sigma when given, as the reference code initialises it).

    Every `weight` and `bias` of the given layer types (BatchNorm: its affine weight and bias; running stats
    stay ordinary buffers) gets a GaussianWeight; then their mu and log sigma move into the model's two flat
    Parameters (`flat_mu`, `flat_log_sigma`; `flat_posterior(model)` holds the layout), the layers keeping
    views. Returns the model for chaining.
    """
    if is_bayesian(model):
        raise ValueError("model is already Bayesian")
    for module in list(model.modules()):
        if not isinstance(module, layer_types):
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                gaussian = GaussianWeight(param.detach(), init_sigma, prior_sigma, init_log_sigma).to(param.device)
                parametrize.register_parametrization(module, name, gaussian)
    weights = _walk(model)
    if weights:
        FlatPosterior.adopt(model, weights)
    return model


def bayesian_weights(model: nn.Module) -> list[tuple[nn.Module, str, GaussianWeight]]:
    """(module, parameter name, GaussianWeight) for every Bayesian weight, in a fixed module order."""
    posterior = flat_posterior(model)
    return list(posterior.weights) if posterior is not None else _walk(model)


def _walk(model: nn.Module) -> list[tuple[nn.Module, str, GaussianWeight]]:
    found = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, GaussianWeight):
                    found.append((module, name, p))
    return found


def is_bayesian(model: nn.Module) -> bool:
    return any(True for _ in bayesian_weights(model))


def _mu(module: nn.Module, name: str) -> torch.Tensor:
    return module.parametrizations[name].original


def set_noise_mode(model: nn.Module, mode: NoiseMode) -> None:
    """Set every Bayesian weight to "sample" (fresh eps per forward), "fixed" (held eps) or "mean"."""
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")
    for _, _, g in bayesian_weights(model):
        g.mode = mode


@contextlib.contextmanager
def noise_mode(model: nn.Module, mode: NoiseMode) -> Iterator[None]:
    """Temporarily switch the noise mode (restores each weight's previous mode)."""
    weights = bayesian_weights(model)
    before = [g.mode for _, _, g in weights]
    set_noise_mode(model, mode)
    try:
        yield
    finally:
        for (_, _, g), m in zip(weights, before, strict=True):
            g.mode = m


def sample_noise(model: nn.Module, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Draw eps ~ N(0, 1) for every Bayesian weight, hold it (mode "fixed") and return the list.

    With a `generator` the draw is reproducible (drawn on the generator's device, then moved). A flat
    posterior draws all weights' eps with one randn (in `bayesian_weights` order) and returns views of it.
    """
    posterior = flat_posterior(model)
    if posterior is not None:
        posterior.hold(posterior.draw(generator))
        return list(posterior.eps_list())
    eps = []
    for module, name, _ in bayesian_weights(model):
        mu = _mu(module, name)
        gen_device = generator.device if generator is not None else mu.device
        e = torch.randn(mu.shape, generator=generator, device=gen_device, dtype=torch.float32)
        eps.append(e.to(mu.device))
    set_noise(model, eps)
    return eps


def set_noise(model: nn.Module, eps: Sequence[torch.Tensor]) -> None:
    """Hold the given eps tensors (one per Bayesian weight, in `bayesian_weights` order; may require grad)."""
    weights = bayesian_weights(model)
    posterior = flat_posterior(model)
    if len(eps) != len(weights):
        raise ValueError(f"expected {len(weights)} eps tensors, got {len(eps)}")
    for (module, name, g), e in zip(weights, eps, strict=True):
        if e.shape != g.log_sigma.shape:
            raise ValueError(f"eps for {name} of {module.__class__.__name__} has shape {tuple(e.shape)}, "
                             f"expected {tuple(g.log_sigma.shape)}")
    if posterior is not None:
        posterior.hold_list(eps)
        return
    for (_, _, g), e in zip(weights, eps, strict=True):
        g.eps = e
        g.mode = "fixed"


def get_noise(model: nn.Module) -> list[torch.Tensor | None]:
    """The eps currently held by each Bayesian weight (None where none was set)."""
    return [g.eps for _, _, g in bayesian_weights(model)]


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Sum over all Bayesian weights of KL(q(w) || N(0, sigma_0^2)) in closed form (a 0-dim tensor)."""
    posterior = flat_posterior(model)
    if posterior is not None:
        return posterior.kl()
    terms = [g.kl(_mu(m, n)) for m, n, g in bayesian_weights(model)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep normalising with batch statistics but do not update running stats.

    In train mode `_BatchNorm.forward` passes the running buffers to F.batch_norm only while
    `track_running_stats` is True, so switching it off for the duration leaves them (and
    num_batches_tracked) untouched while the forward is the same as in training.
    """
    posterior = flat_posterior(model)
    layers = posterior.batchnorms if posterior is not None else model.modules()
    bns = [m for m in layers if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def load_deterministic_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a deterministic checkpoint (same architecture) into a Bayesian model: weights become mu.

    Keys `a.b.weight` map to `a.b.parametrizations.weight.original`; sigma keeps its init. Missing or
    mismatched keys raise with their names (strict), so a wrong checkpoint fails before training.
    """
    mapped = {}
    parametrized = {(m, n) for m, n, _ in bayesian_weights(model)}
    names = {id(m): prefix for prefix, m in model.named_modules()}
    renames = {
        f"{names[id(m)]}.{n}".lstrip("."): f"{names[id(m)]}.parametrizations.{n}.original".lstrip(".")
        for m, n in parametrized
    }
    for key, value in state.items():
        mapped[renames.get(key, key)] = value
    own = model.state_dict()
    expected = {k for k in own if not k.endswith(".log_sigma")}
    missing = sorted(expected - mapped.keys())
    unexpected = sorted(mapped.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key in (k for k in own if k in expected):
        if own[key].shape != mapped[key].shape:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(mapped[key].shape)}, "
                             f"model {tuple(own[key].shape)}")
    model.load_state_dict(mapped, strict=False)

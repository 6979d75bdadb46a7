"""Checkpoints of older layouts of the Bayesian weights: convert their optimizer state on resume.

Two older layouts:
  - per layer (before the flat posterior), described below;
  - flat in module order (before `FLAT_LAYOUT` 2, which puts the conv and linear weights first, see
    asbatch.bayes.flat.FlatLayout): the flat moments are the same numbers in another order.

Until the flat posterior (asbatch.bayes.flat), every Bayesian weight had its own mu and log sigma Parameters,
so the optimizer's state held one entry per layer and per kind, in `model.parameters()` order: each layer's
`parametrizations.<name>.original` (mu), then its GaussianWeight's `log_sigma`. The model's state_dict kept
its keys, so only the optimizer state needs converting: the per-layer moments are concatenated into the flat
Parameters' moments, in the flat layout. Step counts are the same for every entry (one optimizer), so the
first one is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asbatch.bayes import flat_posterior
from asbatch.bayes.flat import LOG_SIGMA, MU, FlatPosterior

# the flat layout a checkpoint's optimizer state is in (`shared["flat_layout"]`); absent: module order
FLAT_LAYOUT = 2


def _legacy_order(model: nn.Module) -> list[tuple[str, int] | nn.Parameter]:
    """The old `model.parameters()` order: ("mu", i) / ("log_sigma", i) for Bayesian weight i, else the
    Parameter itself."""
    posterior = flat_posterior(model)
    where = {}
    for i, (module, name, g) in enumerate(posterior.weights):
        where[id(module.parametrizations[name])] = ("mu", i)
        where[id(g)] = ("log_sigma", i)
    order: list[tuple[str, int] | nn.Parameter] = []
    for module in model.modules():
        if id(module) in where:
            order.append(where[id(module)])
        order.extend(p for n, p in module._parameters.items()
                     if p is not None and not (module is model and n in (MU, LOG_SIGMA)))
    return order


def is_legacy(model: nn.Module, optimizer_state: dict[str, Any]) -> bool:
    """Was this optimizer state written for the per-layer layout of this (flat Bayesian) model?"""
    saved = sum(len(g["params"]) for g in optimizer_state["param_groups"])
    return flat_posterior(model) is not None and saved == len(_legacy_order(model))


def convert_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                            legacy: dict[str, Any]) -> dict[str, Any]:
    """The legacy (per-layer) optimizer state dict as a state dict for `optimizer` over the flat model."""
    posterior = flat_posterior(model)
    if len(legacy["param_groups"]) != 1 or len(optimizer.param_groups) != 1:
        raise ValueError("a checkpoint of the per-layer layout with several parameter groups cannot be converted")
    order = _legacy_order(model)
    old_ids = legacy["param_groups"][0]["params"]
    per_layer: dict[str, list[dict[str, Any] | None]] = {"mu": [None] * len(posterior.weights),
                                                         "log_sigma": [None] * len(posterior.weights)}
    plain: dict[int, dict[str, Any]] = {}
    for old_id, what in zip(old_ids, order, strict=True):
        state = legacy["state"].get(old_id)
        if isinstance(what, tuple):
            per_layer[what[0]][what[1]] = state
        elif state is not None:
            plain[id(what)] = state
    new_params = optimizer.param_groups[0]["params"]
    flat = {id(posterior.mu): "mu", id(posterior.log_sigma): "log_sigma"}
    state: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(new_params):
        kind = flat.get(id(param))
        merged = _concatenate(per_layer[kind], posterior) if kind else plain.get(id(param))
        if merged is not None:
            state[index] = merged
    group = {k: v for k, v in legacy["param_groups"][0].items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(new_params)))}]}


def _concatenate(states: list[dict[str, Any] | None], posterior: FlatPosterior) -> dict[str, Any] | None:
    """One flat state from per-layer ones: tensors of the layers' shapes are concatenated in the flat layout
    (a layer without state contributes zeros), scalars (Adam's step) taken from the first layer that has them."""
    present = [s for s in states if s is not None]
    if not present:
        return None
    merged: dict[str, Any] = {}
    for key, value in present[0].items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            parts = [s[key] if s is not None else torch.zeros(shape, dtype=value.dtype)
                     for s, shape in zip(states, posterior.shapes, strict=True)]
            merged[key] = posterior.flatten(parts)
        else:
            merged[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return merged


def is_module_order(model: nn.Module, shared: dict[str, Any]) -> bool:
    """Was this flat optimizer state written in module order (before FLAT_LAYOUT 2)?"""
    return flat_posterior(model) is not None and shared.get("flat_layout") != FLAT_LAYOUT


def reorder_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any]) -> dict[str, Any]:
    """A module-order flat optimizer state dict in the current flat layout (the flat Parameters' moments
    permuted; everything else as it was)."""
    posterior = flat_posterior(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    flat = {i for i, p in enumerate(params) if p is posterior.mu or p is posterior.log_sigma}
    reordered = {}
    for index, entry in state["state"].items():
        if index in flat:
            entry = {key: _to_layout(value, posterior) for key, value in entry.items()}
        reordered[index] = entry
    return {**state, "state": reordered}


def _to_layout(value: Any, posterior: FlatPosterior) -> Any:
    """A module-order flat tensor in the posterior's layout (other values as they are)."""
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() != posterior.numel:
        return value
    per_layer = [t.view(shape) for t, shape in zip(value.split(posterior.sizes), posterior.shapes, strict=True)]
    return posterior.flatten(per_layer)

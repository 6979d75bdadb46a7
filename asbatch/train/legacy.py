"""Checkpoints of older layouts of the Bayesian weights: convert their optimizer state on resume.

Older and other layouts:
  - per layer (before the flat posterior), described below;
  - flat in module order (before `FLAT_LAYOUT` 2, which puts the conv and linear weights first, see
    asbatch.bayes.flat.FlatLayout): the flat moments are the same numbers in another order;
  - flat with the other memory order of the conv weights (`speed.channels_last` changed between two segments
    of a run; checkpoints record it in `speed_numerics`): again the same numbers in another order.
A change of a speed setting that changes numbers (`NUMBERS_CHANGING`) between two segments is converted where
it needs to be and reported (`speed_changes`), for every model.

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
from asbatch.bayes.flat import LOG_SIGMA, MU, FlatLayout, FlatPosterior
from asbatch.config import RunConfig

# the flat layout a checkpoint's optimizer state is in (`shared["flat_layout"]`); absent: module order
FLAT_LAYOUT = 2
# the speed settings that change a run's numbers (other kernels), recorded in every checkpoint
NUMBERS_CHANGING = ("compile", "channels_last")


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


def other_saved_layout(model: nn.Module, shared: dict[str, Any]) -> FlatLayout | None:
    """The flat layout a checkpoint's flat optimizer state is in, where it is not the model's (None: the same,
    or a deterministic model)."""
    posterior = flat_posterior(model)
    if posterior is None:
        return None
    if shared.get("flat_layout") != FLAT_LAYOUT:
        saved = FlatLayout.module_order(posterior.shapes)
    else:
        saved = posterior.layout.with_channels_last(bool(_saved_speed(shared).get("channels_last", False)))
    return None if saved == posterior.layout else saved


def checkpoint_record(config: RunConfig) -> dict[str, Any]:
    """What a checkpoint records of how its numbers were laid out and made: the flat layout's version and the
    speed settings that change numbers (channels_last also sets the conv weights' order in the flat layout);
    read back by `other_saved_layout` and `speed_changes`."""
    return {"flat_layout": FLAT_LAYOUT,
            "speed_numerics": {name: getattr(config.speed, name) for name in NUMBERS_CHANGING}}


def _saved_speed(shared: dict[str, Any]) -> dict[str, Any]:
    return shared.get("speed_numerics") or {}


PER_LAYER_WARNING = ("this checkpoint was written before the flat posterior (per-layer optimizer state): converted; "
                     "the run goes on with the new AS noise stream, so it is no longer bitwise equal to an "
                     "uninterrupted run of the older code")
MODULE_ORDER_WARNING = ("this checkpoint was written before the grouped flat layout (conv and linear weights first): "
                        "its optimizer state was reordered; the run goes on with the new AS noise stream, so it is "
                        "no longer bitwise equal to an uninterrupted run of the older code")


def optimizer_state_for(model: nn.Module, optimizer: torch.optim.Optimizer,
                        shared: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A checkpoint's optimizer state dict in the model's flat layout, and what to tell the user about it (a
    change of `speed.channels_last` alone is told by `speed_changes`, for every model)."""
    state = shared["optimizer"]
    if is_legacy(model, state):
        return convert_optimizer_state(model, optimizer, state), [PER_LAYER_WARNING]
    saved = other_saved_layout(model, shared)
    if saved is None:
        return state, []
    notes = [MODULE_ORDER_WARNING] if shared.get("flat_layout") != FLAT_LAYOUT else []
    return relayout_optimizer_state(model, optimizer, state, saved), notes


def speed_changes(config: RunConfig, shared: dict[str, Any]) -> list[str]:
    """A warning when the run resumes with another value of a speed setting that changes numbers: not part of
    the run id, so the run goes on, but it is no longer bitwise equal to an uninterrupted run with either
    value (none: the same values, or a checkpoint that does not record them)."""
    saved = _saved_speed(shared)
    changed = [f"speed.{name} {_word(saved[name])} -> {_word(getattr(config.speed, name))}"
               for name in NUMBERS_CHANGING if name in saved and saved[name] != getattr(config.speed, name)]
    if not changed:
        return []
    return [f"this run resumes with other speed settings than its checkpoint was written with ({', '.join(changed)}): "
            "it goes on with other kernels (with channels_last: its optimizer state converted to the new memory "
            "order, its AS noise on other weights), so it is no longer bitwise equal to an uninterrupted run with "
            "either setting; its results record the new one"]


def _word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def relayout_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                             saved: FlatLayout) -> dict[str, Any]:
    """A flat optimizer state dict laid out by `saved`, in the model's flat layout (the flat Parameters'
    moments permuted; everything else as it was)."""
    posterior = flat_posterior(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    flat = {i for i, p in enumerate(params) if p is posterior.mu or p is posterior.log_sigma}
    converted = {}
    for index, entry in state["state"].items():
        if index in flat:
            entry = {key: _in_layout(value, posterior.layout, saved) for key, value in entry.items()}
        converted[index] = entry
    return {**state, "state": converted}


def _in_layout(value: Any, layout: FlatLayout, saved: FlatLayout) -> Any:
    """A flat tensor laid out by `saved` in `layout` (other values, such as Adam's step, as they are)."""
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() != layout.numel:
        return value
    return layout.convert(value, saved)


def match_param_strides(optimizer: torch.optim.Optimizer) -> None:
    """Give every loaded per-parameter state tensor its parameter's strides (a deterministic conv's moments
    saved in NCHW order, loaded for a channels_last weight): the fused kernels expect them alike."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in list(optimizer.state.get(param, {}).items()):
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)

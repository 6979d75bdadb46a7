"""CIFAR ResNet20/32/44/56/110 and VGG11/13/16/19-BN; each deterministic or Bayesian from one definition."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from asbatch.bayes import flat_posterior, make_bayesian
from asbatch.models.batchnorm import count_batches_together
from asbatch.models.mlp import mlp
from asbatch.models.resnet import cifar_resnet
from asbatch.models.vgg import vgg
from asbatch.names import RESNET_DEPTHS, VGG_NAMES

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    **{f"resnet{depth}": partial(cifar_resnet, depth) for depth in RESNET_DEPTHS},
    **{name: partial(vgg, name) for name in VGG_NAMES},
}


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    bayesian: bool = False,
    init_sigma: float = 0.15,
    prior_sigma: float = 0.15,
    width: int | None = None,
    *,
    init_log_sigma: float | None = None,
    mu_init: str = "model",
    bn_weight_init: str = "ones",
    channels_last: bool = False,
) -> nn.Module:
    """Build a model by name; `bayesian=True` makes every conv / linear / BN affine weight Gaussian.

    `width` scales the channel counts (ResNet: first stage width, default 16; VGG: first block, default 64;
    MLP: hidden units, default 128), for small CPU demos. Any input size works: the heads pool adaptively.
    `init_log_sigma` (overrides `init_sigma`), `mu_init` and `bn_weight_init`: see `reinitialise`;
    `channels_last`: see `to_channels_last`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if width is not None:
        kwargs["width"] = width
    model = count_batches_together(reinitialise(MODELS[name](**kwargs), mu_init, bn_weight_init))
    if bayesian:
        make_bayesian(model, init_sigma=init_sigma, prior_sigma=prior_sigma, init_log_sigma=init_log_sigma)
    return to_channels_last(model) if channels_last else model


def to_channels_last(model: nn.Module) -> nn.Module:
    """The model with every conv weight in channels_last (NHWC) memory order, in place: a Bayesian model's
    flat posterior re-laid out (each conv weight's view then has channels_last strides, so w = mu + sigma * eps
    stays a few flat ops), a deterministic model's 4-D parameters and buffers converted. A conv with a
    channels_last weight gives channels_last activations, and so do the layers after it; on a GPU under bf16 /
    fp16 that is the order its tensor cores read without transposes. Values are unchanged; kernels (so
    rounding) and which eps element goes to which weight are not."""
    posterior = flat_posterior(model)
    if posterior is not None and not posterior.layout.channels_last:
        posterior.relayout(posterior.layout.with_channels_last(True))
    return model.to(memory_format=torch.channels_last)


MU_INITS: tuple[str, ...] = ("model", "uniform_fan_in")
BN_WEIGHT_INITS: tuple[str, ...] = ("ones", "uniform")


@torch.no_grad()
def reinitialise(model: nn.Module, mu_init: str = "model", bn_weight_init: str = "ones") -> nn.Module:
    """Optionally replace a fresh model's init by the reference code's (AISIGSJTU/AS `Rand*` layers).

    mu_init "model": the architecture's own (ResNet: Kaiming normal; VGG, MLP: PyTorch's default);
    "uniform_fan_in": every conv / linear weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
    in_channels * kernel area. bn_weight_init "ones": BatchNorm weight 1 (PyTorch); "uniform": ~ U(0, 1),
    bias 0. Draws from the global torch RNG, layer by layer in module order.
    """
    if mu_init not in MU_INITS or bn_weight_init not in BN_WEIGHT_INITS:
        raise ValueError(f"mu_init must be one of {MU_INITS} and bn_weight_init one of {BN_WEIGHT_INITS}, "
                         f"got {mu_init!r}, {bn_weight_init!r}")
    for m in model.modules():
        if mu_init == "uniform_fan_in" and isinstance(m, nn.Conv2d | nn.Linear):
            bound = 1.0 / math.sqrt(m.weight[0].numel())
            for p in (m.weight, m.bias):
                if p is not None:
                    p.uniform_(-bound, bound)
        elif bn_weight_init == "uniform" and isinstance(m, nn.BatchNorm2d) and m.affine:
            m.weight.uniform_(0.0, 1.0)
            m.bias.zero_()
    return model


__all__ = ["BN_WEIGHT_INITS", "MODELS", "MU_INITS", "build_model", "cifar_resnet", "mlp", "reinitialise",
           "to_channels_last", "vgg"]

"""CIFAR ResNet20/32/44/56/110 and VGG11/13/16/19-BN; each deterministic or Bayesian from one definition."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from asbatch.bayes import make_bayesian
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
) -> nn.Module:
    """Build a model by name; `bayesian=True` makes every conv / linear / BN affine weight Gaussian.

    `width` scales the channel counts (ResNet: first stage width, default 16; VGG: first block, default 64;
    MLP: hidden units, default 128), for small CPU demos. Any input size works: the heads pool adaptively.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if width is not None:
        kwargs["width"] = width
    model = MODELS[name](**kwargs)
    if bayesian:
        make_bayesian(model, init_sigma=init_sigma, prior_sigma=prior_sigma)
    return model


__all__ = ["MODELS", "build_model", "cifar_resnet", "mlp", "vgg"]

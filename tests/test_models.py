"""CIFAR ResNets and VGG-BN: sizes, any number of classes and input size, deterministic and Bayesian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asbatch.bayes import bayesian_weights, noise_mode
from asbatch.models import MODELS, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", [
    ("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586),
    ("resnet56", 853_018), ("resnet110", 1_727_962),
])
def test_cifar_resnet_parameter_counts_match_he_et_al(name, expected):
    # He et al. 2016, table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M; exact counts as printed by
    # akamaster/pytorch_resnet_cifar10 (10 classes, option-A shortcuts)
    assert n_params(build_model(name, 10)) == expected


def test_resnet_option_a_shortcut_has_no_parameters():
    model = build_model("resnet20", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # 1 stem + 9 blocks x 2; no 1x1 projection convs


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("classes, channels, size", [(100, 3, 32), (10, 1, 8)])
def test_every_model_runs_for_any_classes_and_input_size(name, classes, channels, size):
    model = build_model(name, classes, in_channels=channels, width={"vgg": 4, "mlp": 32}.get(name[:3], 16))
    assert model(torch.randn(2, channels, size, size)).shape == (2, classes)


def test_bayesian_model_comes_from_the_same_definition():
    det = build_model("vgg11", 10, width=8)
    bayes = build_model("vgg11", 10, width=8, bayesian=True)
    bayes_modules = dict(bayes.named_modules())
    for name, module in det.named_modules():  # same tree; Bayesian layers are the same classes, parametrized
        assert isinstance(bayes_modules[name], type(module)), name
    n_weights = sum(1 for m in det.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
                    for n in ("weight", "bias") if getattr(m, n, None) is not None)
    assert len(bayesian_weights(bayes)) == n_weights


def test_bayesian_parameter_count_is_twice_the_deterministic():
    assert n_params(build_model("resnet20", 10, bayesian=True)) == 2 * 269_722


def test_bayesian_resnet_in_mean_mode_equals_its_deterministic_source():
    det = build_model("resnet20", 10).eval()
    import copy

    from asbatch.bayes import make_bayesian
    bayes = make_bayesian(copy.deepcopy(det)).eval()
    x = torch.randn(3, 3, 32, 32)
    with noise_mode(bayes, "mean"):
        assert torch.allclose(bayes(x), det(x))


def test_unknown_model_and_bad_depth_are_rejected():
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        build_model("resnet21", 10)
    from asbatch.models import cifar_resnet
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)

"""CIFAR ResNets and VGG-BN: sizes, any number of classes and input size, deterministic and Bayesian."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from asbatch.bayes import bayesian_weights, noise_mode
from asbatch.models import MODELS, build_model
from asbatch.opcount import OpCounter


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


def _with_torch_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` whose BatchNorm layers are plain nn.BatchNorm2d (each bumping its own counter)."""
    from asbatch.models.batchnorm import _LAYERS, BatchNorm2d

    twin = copy.deepcopy(model)
    twin._forward_pre_hooks.clear()
    twin.__dict__.pop(_LAYERS)
    for m in twin.modules():
        if isinstance(m, BatchNorm2d):
            m.__class__ = nn.BatchNorm2d
            del m.__dict__["_counted_by_model"]
    return twin


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_batchnorm_counted_by_the_model_equals_torchs_in_every_mode(precision):
    model = build_model("resnet20", 10, width=4)
    twin = _with_torch_batchnorm(model)
    x = torch.randn(4, 3, 8, 8)
    for mode in ("train", "frozen stats", "eval", "train"):
        outs, grads = [], []
        for m in (model, twin):
            m.train(mode != "eval")
            for bn in m.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.track_running_stats = mode != "frozen stats"
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=precision is not None):
                out = m(xi)
            outs.append(out)
            grads.append(torch.autograd.grad(out.float().square().sum(), [xi, *m.parameters()]))
        assert torch.equal(*outs), mode
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)), mode
        state, twin_state = model.state_dict(), twin.state_dict()
        assert state.keys() == twin_state.keys()
        assert all(torch.equal(state[k], twin_state[k]) for k in state), mode
    assert int(model.bn1.num_batches_tracked) == 2  # the two train-mode forwards; frozen and eval ones not


def test_a_training_forward_bumps_every_batchnorm_counter_in_one_op():
    for depth in (20, 56):
        model = build_model(f"resnet{depth}", 10, width=4)
        with OpCounter() as ops:
            model(torch.randn(2, 3, 8, 8))
        assert ops.ops["_foreach_add_"] == 1 and ops.ops["add_"] == 0
        assert ops.ops["empty"] == 0  # CPU: native_batch_norm without F.batch_norm's unused reserve tensor
        assert all(int(m.num_batches_tracked) == 1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))

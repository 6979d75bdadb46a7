"""Mean-field Gaussian layers: noise modes, one API for eps, closed-form KL, conversion, BN freezing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from asbatch.bayes import (
    bayesian_weights,
    frozen_bn_stats,
    get_noise,
    is_bayesian,
    kl_divergence,
    load_deterministic_state,
    make_bayesian,
    noise_mode,
    sample_noise,
    set_noise,
    set_noise_mode,
)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )


def test_make_bayesian_covers_conv_linear_and_bn_affine_weights():
    net = make_bayesian(small_net())
    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    names = [(next(k.__name__ for k in kinds if isinstance(m, k)), n) for m, n, _ in bayesian_weights(net)]
    assert names == [("Conv2d", "weight"), ("Conv2d", "bias"), ("BatchNorm2d", "weight"),
                     ("BatchNorm2d", "bias"), ("Linear", "weight"), ("Linear", "bias")]
    bn = net[1]
    assert "running_mean" in dict(bn.named_buffers()) and not hasattr(bn.running_mean, "parametrizations")


def test_weight_is_mu_plus_sigma_times_fixed_eps():
    net = make_bayesian(nn.Linear(3, 2), init_sigma=0.3)
    eps = [torch.randn(2, 3), torch.randn(2)]
    set_noise(net, eps)
    mu = net.parametrizations.weight.original
    assert torch.allclose(net.weight, mu + 0.3 * eps[0], atol=1e-7)
    assert torch.allclose(net.bias, net.parametrizations.bias.original + 0.3 * eps[1], atol=1e-7)


def test_mean_mode_gives_the_deterministic_net_and_conversion_keeps_weights_as_mu():
    det = small_net().eval()
    bayes = make_bayesian(copy.deepcopy(det)).eval()
    x = torch.randn(5, 3, 5, 5)
    with noise_mode(bayes, "mean"):
        assert torch.equal(bayes(x), det(x))
    assert not torch.equal(bayes(x), det(x)), "sample mode must add noise"


def test_sample_mode_draws_fresh_noise_each_forward_and_fixed_mode_repeats():
    net = make_bayesian(small_net()).eval()
    x = torch.randn(2, 3, 5, 5)
    assert not torch.equal(net(x), net(x))
    sample_noise(net)
    assert torch.equal(net(x), net(x))


def test_sample_noise_with_generator_is_reproducible_and_returns_held_eps():
    net = make_bayesian(small_net())
    a = sample_noise(net, torch.Generator().manual_seed(7))
    b = sample_noise(net, torch.Generator().manual_seed(7))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert all(u is v for u, v in zip(b, get_noise(net), strict=True))
    assert [tuple(e.shape) for e in a] == [tuple(g.log_sigma.shape) for _, _, g in bayesian_weights(net)]


def test_set_noise_rejects_wrong_count_and_shape():
    net = make_bayesian(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="expected 2 eps"):
        set_noise(net, [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="shape"):
        set_noise(net, [torch.zeros(3, 2), torch.zeros(2)])
    with pytest.raises(ValueError, match="noise mode"):
        set_noise_mode(net, "noisy")


def test_eps_can_require_grad_and_its_gradient_is_sigma_times_weight_gradient():
    net = make_bayesian(nn.Linear(3, 1, bias=False), init_sigma=0.5)
    eps = torch.zeros(1, 3, requires_grad=True)
    set_noise(net, [eps])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    (g,) = torch.autograd.grad(net(x).sum(), [eps])
    assert torch.allclose(g, 0.5 * x)  # d(w x)/d eps = sigma * x


def test_kl_matches_closed_form_by_hand():
    net = make_bayesian(nn.Linear(2, 1, bias=False), init_sigma=0.1, prior_sigma=0.2)
    with torch.no_grad():
        net.parametrizations.weight.original.copy_(torch.tensor([[0.3, -0.4]]))
    # per element: log(0.2/0.1) + (0.1^2 + mu^2) / (2 * 0.2^2) - 0.5
    expected = sum(math.log(2.0) + (0.01 + m * m) / 0.08 - 0.5 for m in (0.3, -0.4))
    assert kl_divergence(net).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_when_posterior_equals_prior():
    net = make_bayesian(nn.Linear(4, 3), init_sigma=0.15, prior_sigma=0.15)
    with torch.no_grad():
        for m, n, _ in bayesian_weights(net):
            m.parametrizations[n].original.zero_()
    assert kl_divergence(net).item() == pytest.approx(0.0, abs=1e-5)  # float32 sum of 15 terms


def test_eps_is_kept_out_of_state_dict_and_buffers():
    net = make_bayesian(small_net())
    sample_noise(net)
    assert not any("eps" in k for k in net.state_dict())
    assert not any("eps" in k for k, _ in net.named_buffers())


def test_deterministic_checkpoint_loads_into_bayesian_twin():
    det = small_net()
    det[1].running_mean.fill_(0.5)
    bayes = make_bayesian(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)))
    load_deterministic_state(bayes, det.state_dict())
    x = torch.randn(2, 3, 5, 5)
    with noise_mode(bayes.eval(), "mean"):
        assert torch.equal(bayes(x), det.eval()(x))


def test_mismatched_deterministic_checkpoint_is_rejected_with_the_key():
    det = nn.Sequential(nn.Linear(4, 3))
    bayes = make_bayesian(nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"shape mismatch for 0\.parametrizations\.weight\.original"):
        load_deterministic_state(bayes, det.state_dict())
    with pytest.raises(ValueError, match="missing"):
        load_deterministic_state(bayes, {})


def test_frozen_bn_stats_keeps_running_stats_but_normalises_with_batch_stats():
    net = small_net().train()
    bn = net[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    with frozen_bn_stats(net):
        out_frozen = net(x)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    out_train = net(x)  # same batch statistics, now also updating the running ones
    assert torch.allclose(out_frozen, out_train)
    assert not torch.equal(before["running_mean"], bn.running_mean)
    assert bn.track_running_stats


def test_is_bayesian_and_double_conversion():
    net = small_net()
    assert not is_bayesian(net)
    make_bayesian(net)
    assert is_bayesian(net)
    with pytest.raises(ValueError, match="already Bayesian"):
        make_bayesian(net)

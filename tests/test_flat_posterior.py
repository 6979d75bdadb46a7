"""The flat posterior: one buffer each for mu, log sigma and eps; per-layer views; a step's launch and sync budget."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from asbatch.adversarial import as_step
from asbatch.bayes import (
    GaussianWeight,
    bayesian_weights,
    flat,
    flat_posterior,
    get_noise,
    kl_divergence,
    make_bayesian,
    noise_mode,
    sample_noise,
    set_noise,
)
from asbatch.opcount import HostReadCounter, OpCounter


def plain_conv_net(blocks: int) -> nn.Sequential:
    """conv-BN-ReLU blocks then a linear head: `blocks` sets how many Bayesian weights there are (4 per block)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def conv_net(blocks: int) -> nn.Module:
    return make_bayesian(plain_conv_net(blocks), init_sigma=0.1).train()


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_every_layers_mu_and_log_sigma_are_views_of_two_flat_parameters():
    net = conv_net(2)
    posterior = flat_posterior(net)
    assert [n for n, _ in net.named_parameters()] == ["flat_mu", "flat_log_sigma"]
    mu, log_sigma = posterior.mu, posterior.log_sigma
    weights = bayesian_weights(net)
    # conv and linear weights first (autocast casts them in one op), then BatchNorm's, each in module order
    cast_first = sorted(weights, key=lambda w: not isinstance(w[0], (nn.Conv2d, nn.Linear)))
    assert isinstance(cast_first[-1][0], nn.BatchNorm2d) and not isinstance(weights[-1][0], nn.BatchNorm2d)
    offset = 0
    for module, name, g in cast_first:
        original = module.parametrizations[name].original
        assert original.data_ptr() == mu.data_ptr() + offset * mu.element_size()
        assert g.log_sigma.data_ptr() == log_sigma.data_ptr() + offset * log_sigma.element_size()
        offset += original.numel()
    assert offset == mu.numel() == log_sigma.numel()
    with torch.no_grad():  # writing a layer's view writes the flat parameter the forward uses
        net[0].parametrizations.weight.original.fill_(0.25)
    assert torch.all(mu[: net[0].weight.numel()] == 0.25)


def test_state_dict_keeps_the_per_layer_keys_and_loads_back_into_the_flat_parameters():
    net, twin = conv_net(2), conv_net(2)
    with torch.no_grad():
        flat_posterior(net).mu.normal_()
        flat_posterior(net).log_sigma.fill_(-1.5)
    state = net.state_dict()
    assert "flat_mu" not in state and "flat_log_sigma" not in state
    assert {"0.parametrizations.weight.original", "0.parametrizations.weight.0.log_sigma",
            "7.parametrizations.bias.original", "1.running_mean"} <= state.keys()
    twin.load_state_dict(state)  # strict: nothing missing, nothing unexpected
    assert torch.equal(flat_posterior(twin).mu, flat_posterior(net).mu)
    assert torch.equal(flat_posterior(twin).log_sigma, flat_posterior(net).log_sigma)
    state["0.parametrizations.weight.original"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.parametrizations\.weight\.original"):
        twin.load_state_dict(state)
    del state["0.parametrizations.weight.original"]
    with pytest.raises(RuntimeError, match=r"Missing key.*0\.parametrizations\.weight\.original"):
        twin.load_state_dict(state)


def test_conversion_deepcopy_and_eval_keep_the_views_on_the_flat_parameters():
    net = conv_net(1)
    x, _ = batch()
    copied = copy.deepcopy(net).double()
    with torch.no_grad():
        flat_posterior(copied).mu.add_(1.0)  # the copy is independent, and its views follow its own flat tensors
    assert not torch.equal(flat_posterior(copied).mu.float(), flat_posterior(net).mu)
    assert copied[0].parametrizations.weight.original.dtype == torch.float64
    assert torch.equal(copied[0].parametrizations.weight.original.float(), net[0].parametrizations.weight.original + 1)
    with noise_mode(copied.eval(), "mean"):
        expected = F.conv2d(x.double(), copied[0].parametrizations.weight.original,
                            copied[0].parametrizations.bias.original, padding=1)
        torch.testing.assert_close(copied[0](x.double()), expected)


def test_a_forward_builds_every_weight_from_one_flat_sample_and_matches_the_per_layer_formula():
    net = conv_net(2).eval()
    x, _ = batch()
    eps = sample_noise(net, torch.Generator().manual_seed(3))
    with OpCounter() as ops:
        out = net(x)
    assert ops.ops["exp"] == 1 and ops.ops["addcmul"] == 1, ops.ops  # not one exp / mul / add per layer
    reference = make_bayesian_by_hand(net)  # the same posterior, per-layer parametrizations, no flat buffers
    set_noise(reference, [e.clone() for e in eps])
    torch.testing.assert_close(out, reference(x))


def make_bayesian_by_hand(net: nn.Module, blocks: int = 2) -> nn.Module:
    """A copy of `net` (a `conv_net(blocks)`) whose Bayesian weights are registered layer by layer with their
    own Parameters, as before the flat posterior."""
    plain = plain_conv_net(blocks)
    for (module, name, g), (m2, n2) in zip(bayesian_weights(net), _weights(plain), strict=True):
        per_layer = GaussianWeight(module.parametrizations[name].original.detach().clone(), prior_sigma=g.prior_sigma)
        with torch.no_grad():
            per_layer.log_sigma.copy_(g.log_sigma)
        parametrize.register_parametrization(m2, n2, per_layer)
        with torch.no_grad():
            m2.parametrizations[n2].original.copy_(module.parametrizations[name].original)
    return plain.train(net.training)


def _weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, n) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d)
            for n in ("weight", "bias")]


def test_one_randn_draws_every_layers_eps_and_the_flat_kl_equals_the_per_layer_sum():
    net = conv_net(3)
    with OpCounter() as ops:
        eps = sample_noise(net, torch.Generator().manual_seed(0))
    assert ops.ops["randn"] == 1 and len(eps) == 14
    assert all(a is b for a, b in zip(eps, get_noise(net), strict=True))
    with torch.no_grad():
        flat_posterior(net).mu.normal_()
        flat_posterior(net).log_sigma.uniform_(-3, 0)
    per_layer = sum(g.kl(m.parametrizations[n].original) for m, n, g in bayesian_weights(net))
    torch.testing.assert_close(kl_divergence(net), per_layer, rtol=1e-5, atol=1e-4)


def as_step_ops(blocks: int, lam: float, steps: int = 5) -> int:
    net = conv_net(blocks)
    x, y = batch()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    for _ in range(2):  # the second step is counted (Adam's state exists)
        with OpCounter() as ops:
            as_step(net, x, y, lam=lam, steps=steps, alpha=0.02, kl_weight=1e-3,
                    generator=torch.Generator().manual_seed(0))
            opt.step()
            opt.zero_grad(set_to_none=True)
    return ops.total


def test_an_as_steps_launches_grow_with_the_network_not_with_its_number_of_weights():
    """Four more Bayesian weights (one conv-BN block) cost an AS step at most 6 x what they cost one training
    pass of the network (the N + 1 = 6 passes; inner passes leave BN's running stats alone, one op less), and
    no per-weight bookkeeping (sampling, ascent, KL, optimizer) on top: before the flat posterior it was
    ~30 ops per weight and step."""
    small, large = as_step_ops(1, 0.8), as_step_ops(2, 0.8)
    plain_small, plain_large = as_step_ops(1, 0.0), as_step_ops(2, 0.0)
    per_block_pass = plain_large - plain_small  # one forward + backward of the block's conv, BN, ReLU
    assert 5 <= per_block_pass <= 12, per_block_pass
    assert 5 * per_block_pass <= large - small <= 6 * per_block_pass, (small, large, per_block_pass)
    # and the step's total stays the network's 6 passes plus a few dozen ops for sampling, ascent and KL
    assert small <= 6 * plain_small, (small, plain_small)


def test_an_as_step_reads_nothing_from_the_device():
    net = conv_net(1)
    x, y = batch()
    with HostReadCounter() as reads:
        out = as_step(net, x, y, lam=0.8, steps=5, alpha=0.02, kl_weight=1e-3, loss_scale=torch.tensor(1024.0))
    assert reads.total == 0, reads.reads
    assert out.total.requires_grad is False and out.adv_logits is not None


def test_eps_given_per_layer_and_changed_in_place_between_forwards_is_what_the_layers_see():
    """As the reference code's eps buffers: set once, then moved in place (under no_grad) between passes."""
    net = conv_net(1).eval()
    x, _ = batch()
    eps = [torch.zeros_like(e) for e in sample_noise(net)]
    set_noise(net, eps)
    with noise_mode(net, "mean"):
        at_mean = net(x)
    torch.testing.assert_close(net(x), at_mean)  # eps = 0 is the mean
    with torch.no_grad():
        for e in eps:
            e.fill_(1.0)
    moved = net(x)
    reference = make_bayesian_by_hand(net, blocks=1)
    set_noise(reference, [torch.ones_like(e) for e in eps])
    torch.testing.assert_close(moved, reference(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_a_pass_casts_every_conv_and_linear_weight_in_one_op_with_autocasts_numbers(dtype, monkeypatch):
    x, y = batch()
    results, casts = [], []
    for one_cast in (True, False):
        net = conv_net(3)
        if not one_cast:  # each layer's weight left to autocast, which casts it on its own (the per-layer way)
            monkeypatch.setattr(flat, "_autocast_dtype", lambda w: None)
        with OpCounter() as ops:
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
        casts.append(ops.ops["_to_copy"])
        results.append([loss, *(p.grad for p in net.parameters())])
        monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    # the 8 conv and linear weights and biases (3 convs and the head): one cast forward and one back for all of
    # them, instead of one each way per tensor (the input's own cast is in both counts)
    assert casts[1] - casts[0] == 2 * (2 * 3 + 2) - 2


def test_channels_last_lays_each_conv_weight_out_nhwc_in_the_flat_buffers_and_changes_no_value():
    """`to_channels_last`: every conv weight's view (mu, log sigma, eps, w of a pass, also cast under autocast)
    has channels_last strides and still aliases the flat buffers; values, state_dict and the per-layer eps API
    are unchanged; a forward agrees with the NCHW model's to rounding, and the weights cost it no copy."""
    from asbatch.models import to_channels_last

    nchw = conv_net(2)
    nhwc = to_channels_last(copy.deepcopy(nchw))
    posterior = flat_posterior(nhwc)
    assert posterior.layout.channels_last and not flat_posterior(nchw).layout.channels_last
    assert all(torch.equal(a, b) for a, b in zip(nchw.state_dict().values(), nhwc.state_dict().values(), strict=True))
    storage = posterior.mu.untyped_storage().data_ptr()
    for module, name, g in bayesian_weights(nhwc):
        mu = module.parametrizations[name].original
        assert mu.untyped_storage().data_ptr() == storage
        if mu.dim() == 4:
            for view in (mu, g.log_sigma):
                assert view.is_contiguous(memory_format=torch.channels_last) and not view.is_contiguous()
    # the same per-layer eps (set through the per-layer API) gives the same weights, so the same outputs
    x, y = batch()
    eps = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(posterior.shapes)]
    outputs = []
    for net in (nchw, nhwc):
        set_noise(net, eps)
        assert all(torch.equal(a, b) for a, b in zip(get_noise(net), eps, strict=True))
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        outputs.append(loss)
    torch.testing.assert_close(*outputs)
    grads = [flat_posterior(net).split(flat_posterior(net).mu.grad) for net in (nchw, nhwc)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    # with the flat eps a step draws, a pass costs the weights no copies: the one extra op pair is this net's
    # Flatten head reading NHWC activations (ResNet and VGG pool first; the trainer's counts are equal)
    counts = []
    for net in (nchw, nhwc):
        sample_noise(net, torch.Generator().manual_seed(0))
        with OpCounter() as ops:
            F.cross_entropy(net(x), y).backward()
        counts.append(ops.ops)
    assert counts[1] - counts[0] == {"clone": 1, "_unsafe_view": 1} and not counts[0] - counts[1], counts
    # a pass under autocast: the conv weights are cast in one op and their views keep channels_last strides
    posterior.begin_pass()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = posterior.current(0)
    posterior.end_pass()
    assert cast.dtype == torch.bfloat16 and cast.is_contiguous(memory_format=torch.channels_last)
    # and any flat tensor goes from one layout to the other and back exactly
    values = torch.randn(posterior.numel)
    layout, nchw_layout = posterior.layout, posterior.layout.with_channels_last(False)
    there = nchw_layout.convert(values, layout)
    assert not torch.equal(there, values) and torch.equal(layout.convert(there, nchw_layout), values)


def test_a_bayesian_model_on_a_device_without_autocast_runs_its_passes():
    """The meta device (shapes without memory, e.g. to size a model) has no autocast: a pass there asks autocast
    nothing and gives the right shapes, an AS step included."""
    net = conv_net(1).to("meta")
    x, y = (t.to("meta") for t in batch())
    assert net(x).shape == (8, 3) and net(x).device.type == "meta"
    out = as_step(net, x, y, lam=0.8, steps=2, alpha=0.02, kl_weight=1e-3)
    assert out.total.device.type == "meta" and flat_posterior(net).mu.grad.shape == flat_posterior(net).mu.shape

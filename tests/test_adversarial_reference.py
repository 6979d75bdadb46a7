"""The `reference` AS variant against a plain-torch transcription of the reference code's training step.

`Transcribed` is written from the rules of AISIGSJTU/AS (`utils.train`, `models/layers/*.py`), not from
asbatch: explicit mu / log-sigma tensors, eps tensors that require grad and whose .grad is never cleared,
`model.zero_grad()` on the parameters only, every train-mode forward updating BatchNorm running statistics,
the KL inside the prediction loss, one backward of the total, an extra forward for the reported output.
Known answers over several consecutive batches: losses, the accumulated eps gradients, the reported and
adversarial outputs, BatchNorm buffers and the parameters after each optimizer step.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests_support import conv_bnn_and_batch
from torch import nn

from asbatch.adversarial import AscentMemory, as_step, reference_as_step
from asbatch.bayes import bayesian_weights, kl_divergence, make_bayesian

LAYOUT = ("conv.w", "bn.w", "bn.b", "fc.w", "fc.b")  # conv_bn_net's Bayesian weights, in order


def conv_bn_net() -> nn.Module:
    """As the reference ResNets: no conv bias in front of BatchNorm (its gradient is rounding noise, so the
    sign of its accumulated gradient would be too)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 3))
    return make_bayesian(net, init_sigma=0.1).train()


class Transcribed:
    """conv(3x3, pad 1, no bias) -> BN -> ReLU -> flatten -> linear, every weight w = mu + exp(log_sigma) * eps."""

    def __init__(self, net: torch.nn.Module, prior_sigma: float):
        weights = bayesian_weights(net)
        self.mu = {k: m.parametrizations[n].original.detach().clone().requires_grad_(True)
                   for k, (m, n, _) in zip(LAYOUT, weights, strict=True)}
        self.log_sigma = {k: g.log_sigma.detach().clone().requires_grad_(True)
                          for k, (_, _, g) in zip(LAYOUT, weights, strict=True)}
        self.eps = {k: torch.zeros_like(v) for k, v in self.mu.items()}  # the reference's eps buffers
        self.running_mean, self.running_var = torch.zeros(4), torch.ones(4)
        self.batches_tracked = 0
        self.sigma_0 = prior_sigma

    def parameters(self) -> list[torch.Tensor]:
        return [t for k in LAYOUT for t in (self.mu[k], self.log_sigma[k])]

    def zero_grad(self) -> None:  # nn.Module.zero_grad: parameters only, the eps buffers keep their .grad
        for p in self.parameters():
            p.grad = None

    def forward(self, x: torch.Tensor, noise: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """fix=True (noise None) uses the eps buffers; otherwise the given fresh noise. Returns (out, kl)."""
        eps = self.eps if noise is None else noise
        w = {k: self.mu[k] + self.log_sigma[k].exp() * eps[k] for k in LAYOUT}
        kl = sum((math.log(self.sigma_0) - self.log_sigma[k]
                  + (self.log_sigma[k].exp() ** 2 + self.mu[k] ** 2) / (2 * self.sigma_0**2) - 0.5).sum()
                 for k in LAYOUT)
        h = F.conv2d(x, w["conv.w"], None, padding=1)
        self.batches_tracked += 1  # train mode: every forward updates the running statistics
        h = F.batch_norm(h, self.running_mean, self.running_var, w["bn.w"], w["bn.b"], True, 0.1, 1e-5)
        return F.linear(F.relu(h).flatten(1), w["fc.w"], w["fc.b"]), kl

    def train_batch(self, x, y, lr, lam, steps, alpha, beta, draw) -> dict[str, torch.Tensor]:
        """utils.train for one batch (ratio = lam), then SGD. `draw()` gives fresh noise for every weight."""
        rloss = torch.zeros(())
        adv_out = None
        if lam > 1e-7:
            with torch.no_grad():
                for k, e in draw().items():
                    self.eps[k].copy_(e)
                    self.eps[k].requires_grad = True
            for _ in range(steps):
                out, _ = self.forward(x, None)
                self.zero_grad()
                (-F.cross_entropy(out, y)).backward()
                with torch.no_grad():
                    for e in self.eps.values():
                        e -= alpha * e.grad.sign()
            adv_out, _ = self.forward(x, None)
            rloss = F.cross_entropy(adv_out, y)
        loss = torch.zeros(())
        if 1 - lam > 1e-7:
            out, kl = self.forward(x, draw())
            loss = F.cross_entropy(out, y) + beta * kl
        loss = (1 - lam) * loss + lam * rloss
        output, _ = self.forward(x, draw())
        self.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in self.parameters():
                p -= lr * p.grad
        return {"loss": loss.detach(), "output": output.detach(), "adv_out": adv_out}

    def accumulated(self) -> list[torch.Tensor]:
        return [self.eps[k].grad if self.eps[k].grad is not None else torch.zeros_like(self.eps[k]) for k in LAYOUT]


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("lam", [0.0, 0.8, 1.0])
def test_reference_variant_equals_the_transcribed_reference_step_over_consecutive_batches(lam):
    lr, steps, alpha, beta = 0.1, 3, 0.05, 1e-2
    net = conv_bn_net()
    ref = Transcribed(net, prior_sigma=0.15)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    memory = AscentMemory.zeros_for(net)
    ours_gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)

    # the same draw as asbatch.bayes.sample_noise: one randn, split in the flat layout (conv and linear weights
    # first, then BatchNorm's, each in module order)
    flat_order = [k for k in LAYOUT if not k.startswith("bn.")] + [k for k in LAYOUT if k.startswith("bn.")]

    def draw() -> dict[str, torch.Tensor]:
        flat = torch.randn(sum(ref.mu[k].numel() for k in LAYOUT), generator=ref_gen)
        parts = flat.split([ref.mu[k].numel() for k in flat_order])
        return {k: e.view(ref.mu[k].shape) for k, e in zip(flat_order, parts, strict=True)}

    bn = net[1]
    for i, (x, y) in enumerate(batches(5)):
        out = reference_as_step(net, x, y, lam=lam, steps=steps, alpha=alpha, kl_weight=beta, memory=memory,
                                generator=ours_gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
        want = ref.train_batch(x, y, lr, lam, steps, alpha, beta, draw)

        assert out.total.item() == pytest.approx(want["loss"].item(), rel=1e-5), f"batch {i}"
        torch.testing.assert_close(out.pred_logits, want["output"], rtol=1e-5, atol=1e-5)
        if lam > 0:
            torch.testing.assert_close(out.adv_logits, want["adv_out"], rtol=1e-5, atol=1e-5)
        else:
            assert out.adv_logits is None
        for got, exp in zip(memory.tensors, ref.accumulated(), strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == ref.batches_tracked
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        for (m, n, g), k in zip(bayesian_weights(net), LAYOUT, strict=True):
            mu = m.parametrizations[n].original.detach()
            torch.testing.assert_close(mu, ref.mu[k].detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g.log_sigma.detach(), ref.log_sigma[k].detach(), rtol=1e-5, atol=1e-6)
    forwards = (steps + 1 if lam > 0 else 0) + (1 if lam < 1 else 0) + 1
    assert ref.batches_tracked == 5 * forwards
    if lam > 0:  # the accumulator is not a one-batch quantity: it holds all five batches' gradients
        assert all(t.abs().sum() > 0 for t in memory.tensors)


def test_the_accumulator_is_history_a_fresh_one_gives_a_different_ascent():
    # Same weights, same batch and noise: with five batches of history in G the ascent ends elsewhere than
    # with an empty G (where the first step is the paper's first step).
    net, x, y = conv_bnn_and_batch()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    memory = AscentMemory.zeros_for(net)
    for bx, by in batches(5):
        reference_as_step(net, bx, by, lam=1.0, steps=3, alpha=0.05, kl_weight=0.0, memory=memory,
                          generator=torch.Generator().manual_seed(1))
        net.zero_grad(set_to_none=True)
    outs = {}
    for name, mem in (("history", memory), ("fresh", AscentMemory.zeros_for(net))):
        net.load_state_dict(state)
        outs[name] = reference_as_step(net, x, y, lam=1.0, steps=3, alpha=0.05, kl_weight=0.0, memory=mem,
                                       generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(outs["history"].adv_logits, outs["fresh"].adv_logits)


def test_kl_is_weighted_by_one_minus_lambda_and_absent_at_lambda_one():
    # With alpha = 0 eps_N = eps_0 and the CE parts cancel in the difference of two KL weights.
    x, y = conv_bnn_and_batch()[1:]
    totals = {}
    for lam in (0.5, 1.0):
        for beta in (0.0, 1.0):
            net = conv_bnn_and_batch()[0]
            out = reference_as_step(net, x, y, lam=lam, steps=2, alpha=0.0, kl_weight=beta,
                                    memory=AscentMemory.zeros_for(net), generator=torch.Generator().manual_seed(4))
            totals[lam, beta] = out.total.item()
    kl = kl_divergence(conv_bnn_and_batch()[0]).item()
    assert totals[0.5, 1.0] - totals[0.5, 0.0] == pytest.approx(0.5 * kl, rel=1e-5)
    assert totals[1.0, 1.0] == totals[1.0, 0.0]


def test_prediction_pass_uses_noise_independent_of_eps0():
    # alpha = 0: the paper's L_pred and L_adv are both taken at eps_0 and equal; the reference's L_pred is
    # taken at fresh noise and differs.
    net_a, x, y = conv_bnn_and_batch()
    paper = as_step(net_a, x, y, lam=0.5, steps=2, alpha=0.0, kl_weight=0.0, generator=torch.Generator().manual_seed(5))
    net_b = conv_bnn_and_batch()[0]
    ref = reference_as_step(net_b, x, y, lam=0.5, steps=2, alpha=0.0, kl_weight=0.0,
                            memory=AscentMemory.zeros_for(net_b), generator=torch.Generator().manual_seed(5))
    assert paper.pred.item() == pytest.approx(paper.adv.item(), rel=1e-6)
    assert ref.adv.item() == pytest.approx(paper.adv.item(), rel=1e-6)  # same eps_0 draw
    assert ref.pred.item() != pytest.approx(ref.adv.item(), rel=1e-3)


def test_memory_round_trips_through_its_state_dict_and_rejects_another_model():
    net = conv_bnn_and_batch()[0]
    memory = AscentMemory.zeros_for(net)
    memory.add([torch.full_like(t, 2.0) for t in memory.tensors], loss_scale=4.0)
    assert all(torch.equal(t, torch.full_like(t, 0.5)) for t in memory.tensors)
    memory.add([torch.full_like(t, float("nan")) for t in memory.tensors])  # non-finite entries add nothing
    restored = AscentMemory.zeros_for(net)
    restored.load_state_dict(memory.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(memory.tensors, restored.tensors, strict=True))
    other = AscentMemory([torch.zeros(3)])
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict(memory.state_dict())

"""The reference code's settings as config values: sigma given as log sigma, mu and BatchNorm init, ImageNet
normalisation, the held-out digits, fp32 inner passes under autocast, and their validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from asbatch.bayes import bayesian_weights, kl_divergence, make_bayesian
from asbatch.config import DataConfig, RunConfig
from asbatch.data import IMAGENET_STATS, load, load_for
from asbatch.models import build_model
from asbatch.train.setup import autocast_forward, full_precision


def test_init_log_sigma_is_written_into_log_sigma_as_the_reference_does():
    net = build_model("resnet20", 10, bayesian=True, width=4, init_log_sigma=0.15)
    for _, _, g in bayesian_weights(net):
        assert torch.all(g.log_sigma == torch.tensor(0.15))
        assert torch.allclose(g.sigma, torch.tensor(math.exp(0.15)))  # ~1.16, not 0.15


def test_uniform_fan_in_mu_and_uniform_bn_weight_follow_the_reference_layers():
    torch.manual_seed(0)
    net = build_model("resnet20", 10, bayesian=True, width=8, mu_init="uniform_fan_in", bn_weight_init="uniform")
    for m, n, _ in bayesian_weights(net):
        mu = m.parametrizations[n].original.detach()
        if isinstance(m, nn.BatchNorm2d):
            if n == "weight":
                assert mu.min() >= 0 and mu.max() <= 1 and mu.std() > 0.2  # U(0, 1): std 0.29
            else:
                assert torch.all(mu == 0)
        else:
            bound = 1 / math.sqrt(m.weight[0].numel())  # fan_in = in_channels * kernel area
            assert mu.abs().max() <= bound
            if n == "weight":  # hundreds of draws: the largest is near the bound
                assert mu.abs().max() > 0.9 * bound
    default = build_model("resnet20", 10, bayesian=True, width=8)
    bn_weights = [m.parametrizations.weight.original for m, n, _ in bayesian_weights(default)
                  if isinstance(m, nn.BatchNorm2d) and n == "weight"]
    assert all(torch.all(w == 1) for w in bn_weights)


def test_kl_keeps_float64_mu_in_float64():
    net = make_bayesian(nn.Linear(3, 2).double(), init_sigma=0.2, prior_sigma=0.15)
    kl = kl_divergence(net)
    want = sum((math.log(0.15 / 0.2) + (0.2**2 + p.double() ** 2) / (2 * 0.15**2) - 0.5).sum()
                for p in (net.parametrizations.weight.original, net.parametrizations.bias.original))
    assert kl.dtype == torch.float64
    assert kl.item() == pytest.approx(want.item(), rel=1e-7)


def test_imagenet_normalisation_replaces_the_data_sets_statistics_and_needs_three_channels():
    data = load_for(DataConfig(name="synthetic", normalize="imagenet"), "train")
    assert (data.mean, data.std) == IMAGENET_STATS
    assert load_for(DataConfig(name="synthetic"), "train").mean != IMAGENET_STATS[0]
    with pytest.raises(ValueError, match="imagenet needs 3-channel images; digits has 1"):
        load_for(DataConfig(name="digits", normalize="imagenet"), "train")


def test_held_out_digits_split_classes_and_never_overlap():
    train, test = load("digits_0to7", "train"), load("digits_0to7", "test")
    ood = load("digits_8to9", "test")
    assert train.num_classes == test.num_classes == 8
    assert int(train.labels.max()) == int(test.labels.max()) == 7
    assert set(ood.labels.tolist()) == {8, 9}
    full = load("digits", "train")
    assert len(train) + int((full.labels >= 8).sum()) == len(full)
    assert len(ood) == int((load("digits", "train").labels >= 8).sum() + (load("digits", "test").labels >= 8).sum())
    assert (ood.mean, ood.std) == (train.mean, train.std)  # normalised as the in-distribution inputs


def test_full_precision_switches_an_autocast_forward_to_fp32():
    seen = []
    net = nn.Sequential(nn.Linear(4, 2))
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    net = autocast_forward(net, torch.device("cpu"), torch.bfloat16)
    x = torch.randn(3, 4)
    assert net(x).dtype == torch.float32  # outputs always come back fp32
    with full_precision():
        net(x)
    net(x)
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16]


@pytest.mark.parametrize(("section", "values", "message"), [
    ("model", {"init_log_sigma": float("nan")}, "finite number"),
    ("model", {"init_log_sigma": 50.0}, "less than or equal to 5"),
    ("model", {"init_log_sigma": 0.15, "init_sigma": 0.1}, "not both"),
    ("model", {"mu_init": "kaiming"}, "'model' or 'uniform_fan_in'"),
    ("model", {"bn_weight_init": "zeros"}, "'ones' or 'uniform'"),
    ("adversarial", {"variant": "authors"}, "'paper' or 'reference'"),
    ("adversarial", {"inner_precision": "fp16"}, "'autocast' or 'fp32'"),
    ("data", {"normalize": "cifar"}, "'dataset' or 'imagenet'"),
    ("optim", {"reset_each_epoch": "sometimes"}, "valid boolean"),
])
def test_bad_reference_settings_are_rejected_naming_the_field(section, values, message):
    with pytest.raises(ValidationError, match=message) as err:
        RunConfig.model_validate({section: values})
    assert section in str(err.value)


def test_the_reference_settings_change_the_run_id_and_default_to_asbatchs_own():
    base = RunConfig()
    assert (base.adversarial.variant, base.model.mu_init, base.model.bn_weight_init, base.data.normalize) == (
        "paper", "model", "ones", "dataset")
    assert base.model.init_log_sigma is None and not base.optim.reset_each_epoch
    ref = RunConfig.model_validate({"adversarial": {"variant": "reference"}})
    assert ref.run_id != base.run_id


def test_tables_keep_paper_and_reference_runs_apart():
    from asbatch.analysis import paper_tables
    from asbatch.analysis.aggregate import aggregate, default_grouping
    from asbatch.analysis.records import Record

    metrics = dict(lowest=80.0, highest=85.0, mean_acc=82.0, retained_20=99.0, retained_40=98.0, retained_60=97.0,
                   retained_80=96.0, ece=0.05, nll=0.5, brier=0.2, aurc=0.03)

    def rec(run_id: str, lam: float, variant: str, ensemble: float) -> Record:
        return Record(run_id=run_id, sweep="s", stage="train", data="digits", model="resnet20", bayesian=True,
                      lam=lam, as_on=lam > 0, fine_tuned=False, seed=0, variant=variant, ensemble=ensemble,
                      **metrics)

    records = [rec("p0", 0.0, "paper", 90.0), rec("p1", 0.8, "paper", 92.0),
               rec("r0", 0.0, "reference", 80.0), rec("r1", 0.8, "reference", 70.0)]
    assert default_grouping(records)[-1] == "variant"
    assert default_grouping(records[:2])[-1] != "variant"  # one variant: nothing to separate
    groups = aggregate(records, by=default_grouping(records))
    assert sorted((g.get("variant"), g.get("as_on"), g["ensemble"].mean) for g in groups) == [
        ("paper", False, 90.0), ("paper", True, 92.0), ("reference", False, 80.0), ("reference", True, 70.0)]
    text = paper_tables(groups, "md")
    assert "variant=reference" in text and "variant=paper" in text


@pytest.mark.parametrize(("inner", "expected"), [("fp32", 5), ("autocast", 0)])
def test_trainer_runs_the_inner_passes_in_fp32_under_bf16_when_asked(monkeypatch, tmp_path, inner, expected):
    import contextlib

    from tests_support import tiny_digits_config

    import asbatch.train.trainer as trainer
    from asbatch.train import train

    entered = []
    real = trainer.full_precision

    @contextlib.contextmanager
    def counting():
        entered.append(1)
        with real():
            yield

    monkeypatch.setattr(trainer, "full_precision", counting)
    cfg = tiny_digits_config("inner", cpu=True, precision="bf16", adversarial={"lam": 0.8, "inner_precision": inner})
    results = train(cfg, tmp_path / cfg.run_id)  # 320 images / 64 = 5 steps
    assert len(entered) == expected  # fp32: once per step
    assert (results["train"]["global_steps"], results["train"]["skipped_steps"]) == (5, 0)
    assert results["train"]["precision"] == "bf16"

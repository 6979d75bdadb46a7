"""The training loop reads the device only at poll points; a NaN is still caught before any checkpoint; old
checkpoints (per-layer optimizer state) resume; speed settings keep the run id."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from asbatch.bayes import GaussianWeight, bayesian_weights, flat_posterior, make_bayesian, noise_mode
from asbatch.config import RunConfig
from asbatch.opcount import HostReadCounter
from asbatch.rundir import RunDir
from asbatch.train import NonFiniteLossError, checkpoint, legacy
from asbatch.train.trainer import Trainer


def config(**over) -> RunConfig:
    base = {"sweep": "t", "cpu": True,
            "data": {"name": "digits", "batch_size": 32, "test_batch_size": 360, "train_subset": 320},
            "model": {"name": "mlp", "init_sigma": 0.01, "width": 16}, "schedule": {"name": "cosine", "epochs": 2},
            "adversarial": {"lam": 0.8, "steps": 2}, "eval": {"num_samples": 2}}
    base.update(over)
    return RunConfig.model_validate(base)


def test_an_epoch_reads_the_device_once_per_poll_and_once_for_its_tally(tmp_path):
    trainer = Trainer(config(speed={"poll_every": 4}), RunDir(tmp_path / "r"))  # 10 steps: polls after 4 and 8
    with HostReadCounter() as reads:
        loss_sum, _ = trainer.run_epoch(None, None)
    # 2 polls + the epoch-end poll (steps 9-10) + the tally: no read inside any of the 10 steps
    assert reads.total == 4, reads.reads
    assert trainer.prog.global_step == 10 and trainer.prog.epoch_seen == 320
    assert 0 < trainer.prog.epoch_correct <= 320 and loss_sum == trainer.prog.epoch_loss_sum > 0


def test_a_nan_found_at_the_next_poll_names_its_step_and_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("ASBATCH_FAULT", "nan:5")
    cfg = config(checkpoint_every=3, speed={"poll_every": 50})
    trainer = Trainer(cfg, RunDir(tmp_path / "r"))
    with pytest.raises(NonFiniteLossError, match=r"at global step 5 \(epoch 1\); the last good checkpoint \(step 3\)"):
        trainer.run_epoch(None, None)
    # the checkpoint due at step 6 polled first: step 3's is the newest, and nothing after the bad step was saved
    assert checkpoint.latest_step(trainer.run_dir.checkpoints) == 3
    assert trainer.prog.global_step == 6


def test_speed_settings_keep_the_run_id_and_only_compile_and_channels_last_make_another_experiment():
    from asbatch.analysis.configs import experiment_config, flatten_config

    def experiment(c: RunConfig) -> dict:
        return experiment_config(flatten_config(c.to_dict()))

    a, b, c, d = (config(), config(speed={"poll_every": 7}), config(speed={"compile": True}),
                  config(speed={"channels_last": True}))
    assert a.run_id == b.run_id == c.run_id == d.run_id
    # compiled and channels_last kernels round differently: never pooled with the others
    assert experiment(a) == experiment(b) != experiment(c) != experiment(d) != experiment(a)


def test_a_compiled_run_compiles_each_kind_of_pass_once_and_learns_as_the_eager_one(tmp_path):
    from torch._dynamo.utils import counters

    from asbatch.train import train

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    optim, model = {"lr": 0.01}, {"name": "mlp", "init_sigma": 0.01, "width": 64}
    eager = train(config(optim=optim, model=model), tmp_path / "eager")
    start = graphs()
    compiled = train(config(optim=optim, model=model, speed={"compile": True}), tmp_path / "compiled")
    per_run = graphs() - start  # prediction, inner (BN frozen) and adversarial passes, the smaller last batch
    assert compiled["train"]["compiled"] is True and eager["train"]["compiled"] is False
    assert 3 <= per_run <= 8, per_run
    # after a resume (a fresh compile): the same graphs again, and none more in a later epoch
    longer = config(optim=optim, model=model, speed={"compile": True}, schedule={"name": "cosine", "epochs": 4})
    trainer = Trainer(longer, RunDir(tmp_path / "compiled"))
    trainer.resume()
    start = graphs()
    trainer.run_epoch(None, None)
    trainer.finish_epoch()
    assert graphs() - start == per_run
    trainer.run_epoch(None, None)
    assert graphs() - start == per_run
    # same data, seeds and noise: the compiled run learns what the eager one does (rounding apart)
    acc = [r["evaluation"]["ensemble_accuracy"] for r in (eager, compiled)]
    assert abs(acc[0] - acc[1]) <= 0.05 and min(acc) >= 0.5, acc


def per_layer_twin(net: nn.Module) -> nn.Module:
    """`net` as the code before the flat posterior built it: every Bayesian weight with its own mu and log sigma
    Parameters (parametrizations registered by hand, no flat buffers)."""
    twin = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    for (module, name, g), (m2, n2) in zip(bayesian_weights(net), [(twin[0], "weight"), (twin[0], "bias"),
                                                                   (twin[2], "weight"), (twin[2], "bias")],
                                           strict=True):
        per_layer = GaussianWeight(module.parametrizations[name].original.detach().clone())
        with torch.no_grad():
            per_layer.log_sigma.copy_(g.log_sigma)
        parametrize.register_parametrization(m2, n2, per_layer)
        with torch.no_grad():
            m2.parametrizations[n2].original.copy_(module.parametrizations[name].original)
    return twin


def adam_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        with noise_mode(model, "mean"):
            loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_a_per_layer_optimizer_state_of_an_older_checkpoint_is_converted_to_the_flat_layout():
    torch.manual_seed(0)
    net = make_bayesian(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    old = per_layer_twin(net)
    old_opt = torch.optim.Adam(old.parameters(), lr=0.01)
    adam_steps(old, old_opt, 3)  # the older code's run: per-layer Adam moments after 3 steps
    net.load_state_dict(old.state_dict())  # model keys are the same in both layouts
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    saved = copy.deepcopy(old_opt.state_dict())  # as torch.load gives it: not the live state's tensors
    assert legacy.is_legacy(net, saved)
    opt.load_state_dict(legacy.convert_optimizer_state(net, opt, saved))
    # the next steps from the converted state are the steps the older code would have taken
    adam_steps(old, old_opt, 2)
    adam_steps(net, opt, 2)
    for (module, name, _), (m2, n2) in zip(bayesian_weights(net), [(old[0], "weight"), (old[0], "bias"),
                                                                   (old[2], "weight"), (old[2], "bias")],
                                           strict=True):
        torch.testing.assert_close(module.parametrizations[name].original, m2.parametrizations[n2].original)
    assert not legacy.is_legacy(net, opt.state_dict())
    assert flat_posterior(net).mu.numel() == 4 * 5 + 5 + 5 * 3 + 3


def as_legacy(state: dict, model: nn.Module) -> dict:
    """A flat-layout optimizer state rewritten as the older code saved it: one entry per layer's mu and log sigma,
    in its `model.parameters()` order (per layer: mu, then log sigma)."""
    posterior = flat_posterior(model)
    entries = []
    for i in range(len(posterior.weights)):
        for flat_index in (0, 1):  # flat_mu, flat_log_sigma
            layer = {k: posterior.view(v, i).clone() if v.dim() else v.clone()
                     for k, v in state["state"].get(flat_index, {}).items()}
            entries.append(layer)
    group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    return {"state": {i: e for i, e in enumerate(entries) if e},
            "param_groups": [{**group, "params": list(range(len(entries)))}]}


def test_resuming_from_an_older_checkpoint_warns_converts_and_continues(tmp_path):
    cfg = config()
    first = Trainer(cfg, RunDir(tmp_path / "r"))
    first.run_epoch(None, None)
    first.finish_epoch()  # a flat-layout checkpoint; its optimizer state rewritten as the older code had it
    ckpt = sorted(first.run_dir.checkpoints.glob("step-*"))[-1]
    shared = torch.load(ckpt / "shared.pt", weights_only=False)
    flat_state = shared["optimizer"]
    shared["optimizer"] = as_legacy(flat_state, first.inner)
    torch.save(shared, ckpt / "shared.pt")
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 10, "world_size": 1}))  # the older code kept no checksums
    second = Trainer(cfg, RunDir(tmp_path / "r"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.resume()
    assert any("before the flat posterior" in str(w.message) for w in caught)
    assert second.prog.epoch == 1
    restored = second.optimizer.state_dict()["state"]
    assert restored.keys() == flat_state["state"].keys() == {0, 1}
    for index, state in flat_state["state"].items():
        assert all(torch.equal(restored[index][k], v) for k, v in state.items())
    second.run_epoch(None, None)  # trains on from the converted state
    assert second.prog.global_step == 20


def test_resuming_from_a_module_order_flat_checkpoint_reorders_its_optimizer_state(tmp_path):
    cfg = config(model={"name": "resnet20", "width": 2, "init_sigma": 0.01},
                 data={"name": "digits", "batch_size": 32, "test_batch_size": 360, "train_subset": 64})
    first = Trainer(cfg, RunDir(tmp_path / "r"))
    first.run_epoch(None, None)
    first.finish_epoch()
    ckpt = sorted(first.run_dir.checkpoints.glob("step-*"))[-1]
    shared = torch.load(ckpt / "shared.pt", weights_only=False)
    current = copy.deepcopy(shared["optimizer"])
    posterior = flat_posterior(first.inner)
    assert posterior.layout.order != sorted(posterior.layout.order)  # BatchNorm's weights moved after the convs
    for state in shared["optimizer"]["state"].values():  # as the older code saved it: flat, in module order
        for key, value in state.items():
            if value.dim() == 1:
                state[key] = torch.cat([t.reshape(-1) for t in posterior.split(value)])
    del shared["flat_layout"]
    torch.save(shared, ckpt / "shared.pt")
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 1}))
    second = Trainer(cfg, RunDir(tmp_path / "r"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.resume()
    assert any("before the grouped flat layout" in str(w.message) for w in caught)
    restored = second.optimizer.state_dict()["state"]
    assert restored.keys() == current["state"].keys() == {0, 1}
    for index, state in current["state"].items():
        assert all(torch.equal(restored[index][k], v) for k, v in state.items())


@pytest.mark.parametrize("bayesian", [True, False])
def test_a_run_resumed_with_the_other_channels_last_setting_converts_its_optimizer_state(tmp_path, bayesian):
    """`speed.channels_last` is not part of the run id, so a run may continue with the other setting: with a
    warning, the flat moments are re-laid out (each layer's numbers kept), a deterministic conv's moments take
    its weight's strides, and the run trains on and records what it ran with."""
    from asbatch.models import build_model
    from asbatch.train import train

    def cfg(nhwc: bool) -> RunConfig:
        return config(model={"name": "resnet20", "width": 2, "init_sigma": 0.01, "bayesian": bayesian},
                      data={"name": "digits", "batch_size": 32, "test_batch_size": 360, "train_subset": 64},
                      adversarial={"lam": 0.8 if bayesian else 0.0, "steps": 2}, speed={"channels_last": nhwc})

    first = Trainer(cfg(False), RunDir(tmp_path / "r"))
    first.run_epoch(None, None)
    first.finish_epoch()

    def per_layer_moments(trainer: Trainer) -> list[torch.Tensor]:
        posterior = flat_posterior(trainer.inner)
        moments = []
        for param in trainer.inner.parameters():
            for value in trainer.optimizer.state[param].values():
                if value.dim() > 0:
                    flat = posterior is not None and value.dim() == 1 and len(value) == posterior.numel
                    moments += posterior.split(value) if flat else [value]
        return moments

    second = Trainer(cfg(True), RunDir(tmp_path / "r"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.resume()
    assert [str(w.message) for w in caught if "speed.channels_last false -> true" in str(w.message)], caught
    assert all(torch.equal(a, b) for a, b in zip(first.inner.state_dict().values(),
                                                 second.inner.state_dict().values(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(per_layer_moments(first), per_layer_moments(second), strict=True))
    for param in second.inner.parameters():  # fused Adam: moments laid out as their parameter
        assert all(v.stride() == param.stride() for v in second.optimizer.state[param].values() if v.dim() > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg(True), tmp_path / "r")
    assert result["train"]["channels_last"] is True and result["train"]["global_steps"] == 4
    # its model.pt loads into a model built the usual way (NCHW), weights equal
    saved = torch.load(RunDir(tmp_path / "r").model_file, weights_only=True)
    fresh = build_model("resnet20", 10, in_channels=1, bayesian=bayesian, width=2)
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())


def test_resuming_with_another_numbers_changing_speed_setting_warns_naming_it():
    """compile and channels_last change a run's numbers but not its id: a checkpoint records them, and a resume
    with another value says which (a change of poll_every, which changes no number, says nothing)."""
    written = {"speed_numerics": {"compile": False, "channels_last": True}}
    (why,) = legacy.speed_changes(config(speed={"compile": True, "channels_last": True}), written)
    assert "speed.compile false -> true" in why and "channels_last" not in why.split(":")[0]
    assert legacy.speed_changes(config(speed={"channels_last": True, "poll_every": 3}), written) == []
    assert legacy.speed_changes(config(speed={"compile": True}), {}) == []  # a checkpoint of older code
    assert legacy.checkpoint_record(config(speed={"compile": True})) == {
        "flat_layout": legacy.FLAT_LAYOUT, "speed_numerics": {"compile": True, "channels_last": False}}

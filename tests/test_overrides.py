"""Command-line overrides (`asbatch run / submit / show SPEC key=value`): they set what editing the spec would
(so the run ids change exactly as they would), make or replace grid axes, are validated with the spec's own
messages before anything is written, are recorded in the manifest and applied again by `retry`."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_helpers import invoke, rejected

from asbatch.launch import Manifest, retry, wait_for_sweep
from asbatch.spec import load_sweep

DEFAULTS = {"cpu": True, "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 128},
            "model": {"name": "mlp", "width": 8, "init_sigma": 0.01}, "schedule": {"name": "cosine", "epochs": 1},
            "adversarial": {"steps": 1}, "eval": {"num_samples": 2}}
SPEC = {"sweep": "over", "profile": "local", "defaults": DEFAULTS,
        "grid": {"adversarial.lam": [0.0, 0.8], "seed": [0, 1]}}


def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def shown(*args):
    """The runs `asbatch show` prints: [(run id, config)]."""
    result = invoke("show", *args)
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.output) if d]
    ids = [line.split()[2] for line in result.output.splitlines() if line.startswith("# run ")]
    assert len(ids) == len(docs)
    return list(zip(ids, docs, strict=True))


def test_an_override_gives_the_run_ids_and_configs_of_the_edited_spec(tmp_path):
    spec = write(tmp_path / "spec.yaml", SPEC)
    edited = write(tmp_path / "edited.yaml", {**SPEC, "defaults": {**DEFAULTS, "schedule": {"name": "cosine",
                                                                                             "epochs": 3}}})
    overridden = shown(spec, "schedule.epochs=3")
    assert overridden == shown(edited)
    assert {c["schedule"]["epochs"] for _, c in overridden} == {3}
    assert {i for i, _ in overridden}.isdisjoint(i for i, _ in shown(spec)), "the run ids must change"
    assert [r.run_id for r in load_sweep(edited).runs] == [i for i, _ in overridden]


def test_a_list_sets_a_grid_axis_and_one_value_replaces_an_axis(tmp_path):
    spec = write(tmp_path / "spec.yaml", SPEC)
    three = shown(spec, "adversarial.lam=[0,0.5,0.8]")
    assert [(c["adversarial"]["lam"], c["seed"]) for _, c in three] == [
        (0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1), (0.8, 0), (0.8, 1)]
    one_seed = shown(spec, "seed=3", "optim.lr=0.01")
    assert [(c["adversarial"]["lam"], c["seed"], c["optim"]["lr"]) for _, c in one_seed] == [(0.0, 3, 0.01),
                                                                                              (0.8, 3, 0.01)]
    new_axis = shown(spec, "model.width=[8,16]")
    assert len(new_axis) == 8 and {c["model"]["width"] for _, c in new_axis} == {8, 16}
    milestones = shown(spec, "schedule.milestones=[1,2]")  # a list-valued field takes a list as its value
    assert len(milestones) == 4 and {tuple(c["schedule"]["milestones"]) for _, c in milestones} == {(1, 2)}
    first = shown(spec, "schedule.epochs=2")[0][0]
    header = invoke("show", spec, "schedule.epochs=2", "--run", first[:12]).output.splitlines()
    assert header[0].endswith("1 run; overrides: defaults.schedule.epochs=2")
    assert header[1].startswith(f"# run {first}  stage train  grid point: lam=0 seed=0")


def test_a_one_run_config_takes_its_own_paths(tmp_path):
    config = write(tmp_path / "one.yaml", {"sweep": "one", **DEFAULTS})
    ((_, cfg),) = shown(config, "optim.lr=0.02", "seed=4")
    assert (cfg["optim"]["lr"], cfg["seed"]) == (0.02, 4)
    rejected(invoke("show", config, "optim.lr=20"), "one.yaml: optim.lr", "less than or equal to 10",
             "(set on the command line: optim.lr=20)")
    rejected(invoke("show", config, "defaults.seed=3"), "one.yaml: defaults: unknown key", "takes its own paths",
             "(set on the command line: defaults.seed=3)")


@pytest.mark.parametrize("command", ["run", "submit", "show"])
@pytest.mark.parametrize(("override", "expected"), [
    ("schedule.epochs=-2", ["spec.yaml: defaults.schedule.epochs", "greater than 0", "schedule.epochs=-2"]),
    ("schedule.epoch=2", ["defaults.schedule.epoch: unknown key", "did you mean 'epochs'", "schedule.epoch=2"]),
    ("adversarial.lam=[0,2]", ["grid.adversarial.lam[1]", "less than or equal to 1", "adversarial.lam=[0,2]"]),
    ("lam=0.3", ["defaults.lam: unknown key", "did you mean 'adversarial.lam'"]),
    ("model.name=resnet21", ["defaults.model.name", "resnet21"]),
    ("optim.lr", ["override 'optim.lr': expected KEY=VALUE"]),
    ("=3", ["expected KEY=VALUE"]),
    ("x=[1", ["override 'x=[1': the value is not plain YAML"]),
    ("defaults.optim=3", ["defaults.optim", "3"]),
    ("foo.bar=1", ["defaults.foo: unknown key", "(set on the command line: foo.bar=1)"]),
    ("model.foo.bar=1", ["defaults.model.foo: unknown key", "(set on the command line: model.foo.bar=1)"]),
    pytest.param(f"seed=[{','.join(map(str, range(20001)))}]",  # cut at 100 characters: the reason still shows
                 ["override 'seed=[0,1,2,", "...: the value is not plain YAML (more than 20000 YAML nodes"],
                 id="20001 seeds"),
])
def test_bad_overrides_are_bad_input_with_the_specs_messages_and_nothing_is_written(tmp_path, command, override,
                                                                                     expected):
    spec = write(tmp_path / "spec.yaml", SPEC)
    runs = tmp_path / "runs"
    args = [command, spec, override] + (["--runs-root", runs] if command != "show" else [])
    rejected(invoke(*args), *expected)
    assert not runs.exists()


def test_overrides_are_recorded_in_the_manifest_and_retry_applies_them_again(tmp_path, monkeypatch):
    spec = write(tmp_path / "spec.yaml", SPEC)
    runs = tmp_path / "runs"
    monkeypatch.setenv("ASBATCH_FAULT", "nan:1")  # the local executor's process inherits it: every run fails
    result = invoke("submit", spec, "schedule.epochs=2", "adversarial.lam=0.5", "seed=[0]", "--executor", "local",
                    "--runs-root", runs)
    assert result.exit_code == 0, result.output
    (record,) = Manifest.load(runs / "over").submissions
    assert record.overrides == {"defaults.schedule.epochs": 2, "grid.adversarial.lam": [0.5], "grid.seed": [0]}
    assert (record.config["schedule"]["epochs"], record.config["adversarial"]["lam"]) == (2, 0.5)
    assert [r.state for r in wait_for_sweep(runs / "over", poll_s=0.5, timeout_s=120).runs] == ["FAILED"]

    monkeypatch.delenv("ASBATCH_FAULT")
    again = retry(runs / "over")  # without the overrides the run id would not be in the spec
    assert [s.run_ids for s in again.submitted] == [[record.run_id]]
    assert [r.state for r in wait_for_sweep(runs / "over", poll_s=0.5, timeout_s=120).runs] == ["COMPLETED"]
    results = json.loads((runs / "over" / record.run_id / "results.json").read_text())
    assert results["config"]["schedule"]["epochs"] == 2 and results["train"]["epochs"] == 2
    assert Manifest.load(runs / "over").submissions[-1].overrides == record.overrides


def test_a_local_dry_run_says_what_will_run_in_which_order_and_writes_nothing(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"env": {"MY_API_KEY": "not-to-be-shown", "OMP_NUM_THREADS": "1"}}))
    spec = write(tmp_path / "spec.yaml", {**SPEC, "profile": str(profile)})
    result = invoke("submit", spec, "seed=[5]", "--executor", "local", "--dry-run", "--jobs", "1", "--runs-root",
                    tmp_path / "runs")
    assert result.exit_code == 0, result.output
    ids = [r.run_id for r in load_sweep(spec, overrides={"grid.seed": [5]}).runs]
    order = f"in one background process, one after another in stage order: {', '.join(ids)}"
    assert order in result.output, result.output
    assert "MY_API_KEY=*** OMP_NUM_THREADS=1" in result.output
    assert "not-to-be-shown" not in result.output and "lam=0.8 seed=5" in result.output
    assert not (tmp_path / "runs").exists()

"""Job specs: validation with one clear message per mistake, grid/stage expansion, profiles, stable run ids."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asbatch.rundir import SweepDir, ref_run_id, resolve_init_from, run_ref
from asbatch.spec import (
    MAX_RUNS,
    PROFILES_ENV,
    Resources,
    SpecError,
    expand,
    load_profile,
    load_spec,
    load_sweep,
    parse_spec,
    parse_time,
)

SPECS = Path(__file__).resolve().parent / "specs"
GOOD = SPECS / "good"


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch):
    monkeypatch.delenv(PROFILES_ENV, raising=False)


def _spec(**overrides) -> dict:
    return {"sweep": "t", **overrides}


# ---------------------------------------------------------------------------------------------- bad specs
# The corpus in tests/specs/bad/ runs through the command line in test_bad_input.py.

def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)


# ---------------------------------------------------------------------------------------------- expansion

@pytest.fixture(scope="module")
def fine_tune():
    return expand(load_spec(GOOD / "fine_tune_c100.yaml"))


def test_stages_come_in_dependency_order(fine_tune):
    assert [s.name for s in fine_tune.stages] == ["pretrain", "fine_tune"]  # the file lists fine_tune first
    assert fine_tune.stage("fine_tune").after == ["pretrain"]
    assert fine_tune.stage("fine_tune").init_from == "pretrain"


def test_grid_ignore_collapses_pretrain_runs(fine_tune):
    pretrain, ft = fine_tune.stage("pretrain").runs, fine_tune.stage("fine_tune").runs
    assert len(pretrain) == 3 * 3 and len(ft) == 3 * 2 * 3
    assert {(r.config.model.name, r.config.seed) for r in pretrain} == {
        (m, s) for m in ("resnet20", "resnet56", "vgg16") for s in (0, 1, 2)}
    assert all(r.config.adversarial.lam == 0.0 and not r.config.model.bayesian for r in pretrain)
    assert all("adversarial.lam" not in r.point and r.upstream == {} for r in pretrain)
    assert len({r.run_id for r in ft}) == 18


def test_fine_tune_runs_start_from_the_matching_pretrain_run(fine_tune):
    pretrain = {r.run_id: r for r in fine_tune.stage("pretrain").runs}
    for run in fine_tune.stage("fine_tune").runs:
        upstream = pretrain[run.upstream["pretrain"]]
        assert (upstream.config.model.name, upstream.config.seed) == (run.config.model.name, run.config.seed)
        assert run.config.model.init_from == run_ref(upstream.run_id) == f"run:{upstream.run_id}"
        assert run.config.model.bayesian and run.config.schedule.epochs == 100


def test_configs_carry_sweep_stage_and_defaults(fine_tune):
    for stage in fine_tune.stages:
        for run in stage.runs:
            assert (run.config.sweep, run.config.stage) == ("fine_tune_c100", stage.name)
            assert run.run_id == run.config.run_id and run.run_id.startswith(f"{stage.name}-")
            assert run.config.data.name == "cifar100" and run.config.tracking.tags == ("paper",)


def test_expansion_count_is_the_cartesian_product():
    sweep = expand(load_spec(GOOD / "single_stage.yaml"))
    assert [s.name for s in sweep.stages] == ["train"]
    assert len(sweep.runs) == 2 * 2
    assert {(r.config.optim.lr, r.config.seed) for r in sweep.runs} == {
        (lr, s) for lr in (0.01, 0.001) for s in (0, 1)}
    assert all(r.config.precision == "no" for r in sweep.runs)  # YAML `no` stays a string
    grid = {"seed": [0, 1, 2], "optim.lr": [0.1, 0.2], "model.name": ["mlp", "vgg11"], "eval.num_samples": [1, 5]}
    assert len(expand(parse_spec(_spec(grid=grid))).runs) == 3 * 2 * 2 * 2
    assert len(expand(parse_spec(_spec())).runs) == 1  # no grid: one run per stage


def test_grid_over_a_whole_section_merges_into_defaults():
    spec = _spec(defaults={"data": {"batch_size": 32}},
                 grid={"data": [{"name": "cifar10"}, {"name": "svhn", "batch_size": 64}]})
    runs = expand(parse_spec(spec)).runs
    assert [(r.config.data.name, r.config.data.batch_size) for r in runs] == [("cifar10", 32), ("svhn", 64)]


def test_run_ids_are_stable_and_follow_every_config_value():
    text = (GOOD / "fine_tune_c100.yaml").read_text()
    first = [r.run_id for r in expand(load_spec(GOOD / "fine_tune_c100.yaml")).runs]
    again = [r.run_id for r in expand(parse_spec(yaml.safe_load(text))).runs]
    assert first == again
    changed = yaml.safe_load(text)
    changed["stages"]["pretrain"]["config"]["optim"] = {"lr": 0.01}  # pretrain only...
    ids = [r.run_id for r in expand(parse_spec(changed)).runs]
    assert not set(ids) & set(first)  # ...yet fine_tune ids change too, through model.init_from
    tracking_only = yaml.safe_load(text)
    tracking_only["defaults"]["tracking"]["tags"] = ["other"]  # tracking never changes results
    assert [r.run_id for r in expand(parse_spec(tracking_only)).runs] == first


def test_precedence_defaults_then_grid_then_stage_config():
    spec = _spec(defaults={"optim": {"lr": 0.1, "weight_decay": 0.5}, "schedule": {"epochs": 10}, "seed": 7},
                 grid={"optim.lr": [0.2], "schedule.epochs": [20]},
                 stages={"a": {}, "b": {"after": "a", "config": {"schedule": {"epochs": 30}}}})
    sweep = expand(parse_spec(spec))
    a, b = sweep.stage("a").runs[0].config, sweep.stage("b").runs[0].config
    assert (a.optim.lr, a.schedule.epochs, a.optim.weight_decay, a.seed) == (0.2, 20, 0.5, 7)
    assert (b.optim.lr, b.schedule.epochs, b.optim.weight_decay) == (0.2, 30, 0.5)
    assert b.model.init_from is None  # `after` without `init_from` only orders the arrays


def test_topological_order_with_several_upstreams():
    stages = {"report": {"after": ["c", "b"]}, "c": {"after": ["b", "a"]}, "b": {"after": "a"}, "a": {}}
    sweep = expand(parse_spec(_spec(grid={"seed": [0, 1]}, stages=stages)))
    assert [s.name for s in sweep.stages] == ["a", "b", "c", "report"]
    for run in sweep.stage("report").runs:
        assert set(run.upstream) == {"c", "b"}
        upstream = {r.run_id: r for s in sweep.stages for r in s.runs}
        assert all(upstream[rid].config.seed == run.config.seed for rid in run.upstream.values())


def test_collapsed_upstream_is_shared_by_downstream_runs():
    spec = _spec(grid={"seed": [0, 1], "adversarial.lam": [0.2, 0.4, 0.6]},
                 stages={"pre": {"grid_ignore": ["adversarial.lam"],
                                 "config": {"model": {"bayesian": False}, "adversarial": {"lam": 0.0}}},
                         "post": {"after": "pre", "init_from": "pre"}})
    sweep = expand(parse_spec(spec))
    assert len(sweep.stage("pre").runs) == 2 and len(sweep.stage("post").runs) == 6
    assert len({r.upstream["pre"] for r in sweep.stage("post").runs}) == 2


def test_spec_errors_from_plain_data_have_no_file_prefix():
    with pytest.raises(SpecError, match=r"^grid\.seed\[1\]: Input should be a valid integer"):
        expand(parse_spec(_spec(grid={"seed": [0, "x"]})))
    with pytest.raises(SpecError, match="grid: expands to"):
        parse_spec(_spec(grid={"seed": list(range(MAX_RUNS // 2 + 1))}, stages={"a": {}, "b": {}}))


def test_spec_module_needs_neither_torch_nor_submitit():
    code = "import sys, asbatch.spec; print(sorted({'torch', 'submitit'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------- resources

@pytest.mark.parametrize(("value", "minutes"), [
    ("1-00:00:00", 1440), ("08:00:00", 480), (90, 90), ("90", 90), ("00:00:01", 1), ("36:30:00", 2190),
    ("2-12:00:30", 2 * 1440 + 720 + 1)])
def test_time_parsing(value, minutes):
    assert parse_time(value) == minutes
    assert Resources(time=value).timeout_min == minutes


@pytest.mark.parametrize("value", ["25:99", "1:00", "0", 0, -5, "1-24:00:00", "soon", 1.5, True, "8h"])
def test_bad_times_are_rejected(value):
    with pytest.raises(ValueError):
        parse_time(value)


def test_unquoted_yaml_time_is_not_base_60(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("sweep: t\nstages:\n  train:\n    resources: {time: 12:00:00}\n")
    assert load_spec(path).resources["train"].timeout_min == 720  # plain YAML 1.1 would read 43200


def test_resource_defaults_and_extra_flags():
    r = Resources()
    assert (r.nodes, r.gpus_per_node, r.cpus_per_task, r.mem_gb, r.timeout_min, r.array_parallelism) == (
        1, 0, 1, None, 60, 64)
    r = Resources(nodes=2, extra={"exclusive": True, "nice": 10, "mail-type": "END,FAIL"})
    assert r.extra == {"exclusive": "", "nice": "10", "mail-type": "END,FAIL"}  # '' = a bare flag
    with pytest.raises(ValueError, match="gpus_per_node"):
        Resources(gpus_per_node=17)


def test_stage_resources_override_the_profile(fine_tune):
    pre, ft = fine_tune.stage("pretrain").resources, fine_tune.stage("fine_tune").resources
    assert (pre.partition, pre.cpus_per_task, pre.mem_gb) == ("debug", 1, 1.0)  # from profiles/local.yaml
    assert (pre.timeout_min, pre.gpus_per_node, pre.array_parallelism) == (480, 1, 64)
    assert (ft.timeout_min, ft.array_parallelism) == (720, 16)
    assert fine_tune.env == {"OMP_NUM_THREADS": "1"}


def test_shipped_profiles_are_valid():
    local = load_profile("local")
    assert local.resources.partition == "debug" and local.resources.timeout_min == 30
    assert local.resources.gpus_per_node == 0 and local.resources.mem_gb == 1
    gpu = load_profile("example-gpu-cluster")
    assert (gpu.resources.gpus_per_node, gpu.resources.cpus_per_task, gpu.resources.timeout_min) == (4, 8, 1440)
    assert gpu.resources.constraint == "[a100|h100]" and gpu.resources.mem_gb == 64


def test_profiles_from_env_dir_and_by_path(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(
        "partition: big\naccount: lab\ntime: 120\nextra: {mail-type: END}\nenv: {WANDB_MODE: offline}\n")
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    stages = {"a": {"resources": {"time": 10, "extra": {"mail-user": "me@example.org"}}}, "b": {}}
    spec = parse_spec(_spec(profile="mine", stages=stages))
    a, b = spec.resources["a"], spec.resources["b"]
    assert (a.partition, a.account, a.timeout_min) == ("big", "lab", 10)
    assert a.extra == {"mail-type": "END", "mail-user": "me@example.org"}  # merged key by key
    assert (b.timeout_min, b.extra) == (120, {"mail-type": "END"})
    assert expand(spec).env == {"WANDB_MODE": "offline"}
    monkeypatch.delenv(PROFILES_ENV)
    spec = parse_spec(_spec(profile="mine.yaml"), base_dir=tmp_path)  # a path, relative to the spec
    assert spec.profile.name == "mine" and spec.resources["train"].partition == "big"


def test_a_bad_profile_names_the_profile_and_the_field(tmp_path):
    (tmp_path / "bad.yaml").write_text("partition: debug\ngpus: 4\n")
    with pytest.raises(SpecError, match=r"profile 'bad.yaml': gpus: unknown key; "
                                        r"did you mean 'gpus_per_node'\?"):
        parse_spec(_spec(profile="bad.yaml"), base_dir=tmp_path)
    (tmp_path / "inject.yaml").write_text('qos: "normal\\n#SBATCH --qos=high"\n')
    with pytest.raises(SpecError, match="qos: control characters"):
        load_profile(str(tmp_path / "inject.yaml"))


def test_run_refs_resolve_inside_the_runs_root(tmp_path):
    sweep_dir = SweepDir.at(tmp_path, "s")
    assert sweep_dir.run(ref_run_id("run:pretrain-0123456789")).path == tmp_path / "s" / "pretrain-0123456789"
    assert resolve_init_from("/ckpt/x.pt", sweep_dir) == Path("/ckpt/x.pt")
    with pytest.raises(ValueError):
        ref_run_id("run:../../etc")


# ---------------------------------------------------------------------------------------------- overrides

def test_overrides_are_applied_before_validation_with_the_same_messages(tmp_path):
    spec = GOOD / "single_stage.yaml"
    sweep = load_sweep(spec, overrides={"defaults.optim.lr": 0.5, "grid.model.name": ["mlp", "vgg11"],
                                        "stages.train.resources.time": 5})
    assert {r.config.optim.lr for r in sweep.runs} == {0.01, 0.001}  # the grid still wins over defaults
    assert {r.config.model.name for r in sweep.runs} == {"mlp", "vgg11"} and len(sweep.runs) == 8
    assert sweep.stage("train").resources.timeout_min == 5
    with pytest.raises(SpecError, match=rf"^{spec}: defaults.schedule.gamma: Input should be a finite number"):
        load_sweep(spec, overrides={"defaults.schedule.gamma": float("inf")})
    with pytest.raises(SpecError, match=r"defaults.precision.x: defaults.precision is a str \('no'\), not a mapping"):
        load_sweep(spec, overrides={"defaults.precision.x": 1})
    one_run = tmp_path / "one.yaml"
    one_run.write_text("sweep: s\noptim: {lr: 0.1}\n")
    assert load_sweep(one_run, overrides={"optim.lr": 0.2}).runs[0].config.optim.lr == 0.2
    with pytest.raises(SpecError, match=r"one.yaml: optim.lr: Input should be less than or equal to 10 \(got 100\)"):
        load_sweep(one_run, overrides={"optim.lr": 100})


def test_overrides_do_not_change_what_yaml_aliases_share(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("sweep: s\nstages:\n  a: {resources: &r {time: 7}}\n  b: {resources: *r}\n")
    sweep = load_sweep(path, overrides={"stages.a.resources.time": 9})
    assert (sweep.stage("a").resources.timeout_min, sweep.stage("b").resources.timeout_min) == (9, 7)

"""The job specs shipped in jobs/ expand to the runs their comments promise."""

from pathlib import Path

import pytest

from asbatch.spec import load_sweep

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("name, stages", [
    ("quickstart", {"train": 6}),
    ("study_cpu", {"train": 24}),
    ("reproduce_reference_c10", {"train": 18}),
    ("reproduce_reference_c100", {"train": 18}),
    ("train_c10", {"train": 18}),
    ("train_c100", {"train": 18}),
    ("pretrain_c100", {"pretrain": 9}),
    ("fine_tune_c100", {"pretrain": 9, "fine_tune": 18}),
])
def test_shipped_spec_expands_to_the_promised_runs(name, stages):
    sweep = load_sweep(JOBS / f"{name}.yaml")
    assert {s.name: len(s.runs) for s in sweep.stages} == stages
    assert list(stages) == [s.name for s in sweep.stages]


def test_fine_tune_runs_start_from_the_matching_pretrain_run():
    sweep = load_sweep(JOBS / "fine_tune_c100.yaml")
    pretrain = {r.run_id: r.config for r in sweep.stage("pretrain").runs}
    for run in sweep.stage("fine_tune").runs:
        upstream = pretrain[run.config.model.init_from.removeprefix("run:")]
        assert (upstream.model.name, upstream.seed) == (run.config.model.name, run.config.seed)
        assert run.config.model.bayesian and not upstream.model.bayesian


def test_paper_specs_use_the_paper_settings():
    for name in ("train_c10", "train_c100"):
        for run in load_sweep(JOBS / f"{name}.yaml").runs:
            c = run.config
            assert (c.schedule.epochs, c.schedule.milestones, c.optim.name) == (200, (80, 140, 180), "adam")
            assert (c.adversarial.steps, c.adversarial.alpha) == (5, 0.02)
            assert c.adversarial.lam in (0.0, 0.8)
            assert (c.adversarial.variant, c.precision, c.adversarial.inner_precision) == ("paper", "bf16", "autocast")


def test_reproduce_reference_specs_set_every_reference_setting():
    for name in ("reproduce_reference_c10", "reproduce_reference_c100"):
        for run in load_sweep(JOBS / f"{name}.yaml").runs:
            c = run.config
            assert (c.adversarial.variant, c.adversarial.steps, c.adversarial.alpha) == ("reference", 5, 0.02)
            assert (c.model.init_log_sigma, c.model.prior_sigma) == (0.15, 0.15)
            assert (c.model.mu_init, c.model.bn_weight_init) == ("uniform_fan_in", "uniform")
            assert (c.optim.name, c.optim.lr, c.optim.reset_each_epoch) == ("adam", 0.01, True)
            assert (c.schedule.epochs, c.schedule.milestones, c.data.batch_size) == (200, (80, 140, 180), 100)
            assert (c.data.normalize, c.precision) == ("imagenet", "no")


def test_study_compares_both_variants_at_both_lambdas_with_the_same_settings_otherwise():
    runs = load_sweep(JOBS / "study_cpu.yaml").runs
    cells = {(r.config.adversarial.lam, r.config.adversarial.variant) for r in runs}
    assert cells == {(0.0, "paper"), (0.0, "reference"), (0.8, "paper"), (0.8, "reference")}
    assert len({r.config.seed for r in runs}) >= 5
    rest = {r.config.model_copy(update={"seed": 0, "adversarial": None}).to_dict().__repr__() for r in runs}
    assert len(rest) == 1

"""Tables never pool runs of different configs as seeds (asbatch.analysis.configs / aggregate), and the per-run
DataFrame (asbatch.results, `asbatch table --per-run`): on records built from real RunConfigs for the
combinatorics, and on real finished runs (one-epoch digits MLPs) for the whole path."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner
from tests_support import tiny_digits_config

from asbatch.analysis import (
    NOT_SCIENCE,
    aggregate,
    describe,
    paper_tables,
    record_from_results,
    records_from_run_dirs,
    records_from_wandb,
    sweep_tables,
)
from asbatch.analysis.configs import experiment_config, flatten_config
from asbatch.cli import main
from asbatch.config import RunConfig
from asbatch.results import per_run_table, records_frame, runs_frame


def evaluation(acc: float) -> dict:
    """An evaluation dict as asbatch.evaluate writes it, every accuracy `acc` (a fraction)."""
    return {"lowest_accuracy": acc, "highest_accuracy": acc, "mean_accuracy": acc, "ensemble_accuracy": acc,
            "retained_accuracy": {f: acc for f in ("0.2", "0.4", "0.6", "0.8", "1.0")}, "ece": 0.05, "nll": 0.5,
            "brier": 0.2, "aurc": 0.03, "sample_accuracies": [acc, acc], "score": "entropy"}


def run(run_id: str, acc: float = 0.8, **dotted) -> object:
    """The record of a finished run whose config is the defaults (cifar10, resnet20) with `dotted` overrides
    (`**{"schedule.epochs": 8}`), validated as RunConfig: a real resolved config."""
    values: dict = {"sweep": "s", "data": {"name": "cifar10"}, "adversarial": {"lam": 0.0}}
    for key, value in dotted.items():
        *path, last = key.split(".")
        node = values
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    config = RunConfig.model_validate(values)
    results = {"run_id": run_id, "sweep": "s", "stage": config.stage, "config": config.to_dict(),
               "evaluation": evaluation(acc)}
    return record_from_results(results)


def rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")][2:]


# ------------------------------------------------------------------------------------- combinatorics


def test_an_edited_spec_resubmitted_gives_separate_rows_that_name_the_differing_key():
    """The README's workflow: 8 epochs, then the spec edited to 20 and submitted again with the same seeds."""
    records = [run(f"e8-{s}", 0.80 + s / 100, seed=s, **{"schedule.epochs": 8}) for s in range(3)]
    records += [run(f"e8as-{s}", 0.85, seed=s, **{"schedule.epochs": 8, "adversarial.lam": 0.8}) for s in range(3)]
    records += [run(f"e20-{s}", 0.90, seed=s, **{"schedule.epochs": 20}) for s in range(2)]
    records += [run(f"e20as-{s}", 0.95, seed=s, **{"schedule.epochs": 20, "adversarial.lam": 0.8}) for s in range(2)]
    groups = aggregate(records)
    assert [(g.get("as_on"), g.differs, g.n) for g in groups] == [
        (False, {"schedule.epochs": 8}, 3), (False, {"schedule.epochs": 20}, 2),
        (True, {"schedule.epochs": 8}, 3), (True, {"schedule.epochs": 20}, 2)]
    assert groups[0]["ensemble"] == pytest.approx((81.0, 1.0, 3))  # 80, 81, 82: never averaged with the 20-epoch runs
    table = rows(paper_tables(groups, "md"))[:4]
    # rows compared for bold are those of one config: 8-epoch no AS vs AS, 20-epoch no AS vs AS
    assert table == [
        "| CIFAR-10 | ResNet20 [schedule.epochs=8] | 3 | 81.00 ± 1.00 | 81.00 ± 1.00 | 81.00 ± 1.00 |",
        "|  | ResNet20 + AS [schedule.epochs=8] | 3 | **85.00 ± 0.00** | **85.00 ± 0.00** | **85.00 ± 0.00** |",
        "|  | ResNet20 [schedule.epochs=20] | 2 | 90.00 ± 0.00 | 90.00 ± 0.00 | 90.00 ± 0.00 |",
        "|  | ResNet20 + AS [schedule.epochs=20] | 2 | **95.00 ± 0.00** | **95.00 ± 0.00** | **95.00 ± 0.00** |"]
    csv_rows = list(csv.DictReader(io.StringIO(paper_tables(groups, "csv"))))
    assert [(r["as_on"], r["schedule.epochs"], r["n"]) for r in csv_rows] == [
        ("False", "8", "3"), ("True", "8", "3"), ("False", "20", "2"), ("True", "20", "2")]
    latex = paper_tables(groups, "latex")
    assert r"ResNet20 + AS [schedule.epochs=20] & 2 &" in latex


def test_several_differing_keys_are_all_named_and_a_key_only_one_row_sets_is_shown_as_unset():
    records = [run("a", **{"optim.lr": 0.01, "schedule.name": "cosine"}), run("b", **{"optim.lr": 0.001})]
    first, second = aggregate(records)
    assert first.differs == {"optim.lr": 0.001, "schedule.name": "multistep"}
    assert second.differs == {"optim.lr": 0.01, "schedule.name": "cosine"}
    labels = [line.split(" | ")[1] for line in rows(paper_tables([first, second], "md"))[:2]]
    assert labels == ["ResNet20 [optim.lr=0.001, schedule.name=multistep]",
                      "ResNet20 [optim.lr=0.01, schedule.name=cosine]"]
    no_lr = dict(first.config)
    del no_lr["optim.lr"]
    from asbatch.analysis.configs import MISSING, differing_keys

    assert differing_keys([first.config, no_lr]) == ["optim.lr"] and MISSING == "unset"


def test_bookkeeping_keys_do_not_split_a_group_and_n_counts_seeds_not_runs():
    # seed 0 twice (rerun with other checkpointing, another data root, W&B on): one seed, its runs averaged
    records = [run("a", 0.80, seed=0), run("b", 0.82, seed=0, checkpoint_every=50, **{"data.root": "/scratch"}),
               run("c", 0.85, seed=1, keep_checkpoints=5, cpu=True, **{"tracking.wandb": "offline"}),
               run("d", 0.85, seed=1, **{"data.test_batch_size": 500, "tracking.tags": ["x"]}), ]
    (group,) = aggregate(records)
    assert group.n == 2 and group.seeds == (0, 1) and group.run_ids == ("a", "b", "c", "d") and group.differs == {}
    # per seed: 81 and 85 -> mean 83, std sqrt(((81-83)^2 + (85-83)^2) / 1) = sqrt(8)
    assert group["ensemble"] == pytest.approx((83.0, math.sqrt(8), 2))
    assert "| ResNet20 | 2 |" in paper_tables([group], "md")
    assert set(NOT_SCIENCE) >= {"seed", "tracking", "checkpoint_every", "keep_checkpoints"}


def test_a_key_that_changes_the_science_splits_even_where_it_looks_minor():
    for key, value in (("eval.num_samples", 20), ("precision", "bf16"), ("data.train_subset", 1000),
                       ("adversarial.steps", 3), ("model.init_sigma", 0.01), ("eval.seed", 1)):
        groups = aggregate([run("a", seed=0), run("b", seed=1, **{key: value})])
        assert [g.n for g in groups] == [1, 1] and all(list(g.differs) == [key] for g in groups), key


def fine_tune_records(pretrain_epochs: dict[int, int]) -> list:
    """Deterministic pretrain runs (per seed: its epochs) and a Bayesian fine-tune of each, as the spec's
    `init_from: pretrain` writes them (model.init_from = run:<that seed's pretrain run id>)."""
    records = []
    for seed, epochs in pretrain_epochs.items():
        pre = f"pretrain-{seed:010x}"
        records.append(run(pre, 0.9, seed=seed, stage="pretrain", **{"model.bayesian": False,
                                                                     "schedule.epochs": epochs}))
        records.append(run(f"fine-{seed}", 0.8 + seed / 100, seed=seed, stage="fine_tune",
                           **{"model.init_from": f"run:{pre}"}))
    return records


def test_fine_tunes_of_one_pretraining_recipe_pool_over_their_per_seed_upstream_runs():
    (group,) = aggregate(fine_tune_records({0: 200, 1: 200, 2: 200}))
    assert group.get("fine_tuned") and group.n == 3 and group.differs == {}
    assert group.config["model.init_from.schedule.epochs"] == 200 and "model.init_from" not in group.config


def test_fine_tunes_of_different_pretraining_recipes_are_split_and_named():
    groups = aggregate(fine_tune_records({0: 200, 1: 200, 2: 100}))
    assert [(g.differs, g.n) for g in groups] == [({"model.init_from.schedule.epochs": 100}, 1),
                                                  ({"model.init_from.schedule.epochs": 200}, 2)]
    assert r"ResNet20 [model.init\_from.schedule.epochs=100] | 1 |" in paper_tables(groups, "md")
    # upstream runs not among the records: fine-tunes are told apart by the upstream's stage only
    alone = [r for r in fine_tune_records({0: 200, 1: 100}) if r.bayesian]
    assert [g.n for g in aggregate(alone)] == [2]
    assert experiment_config(alone[0].config)["model.init_from"] == "run:pretrain"


def test_experiment_config_leaves_out_exactly_the_listed_keys():
    flat = flatten_config(RunConfig(seed=3, tracking={"wandb": "offline"}).to_dict())
    kept = experiment_config(flat)
    assert set(flat) - set(kept) == {k for k in flat if k.split(".")[0] in NOT_SCIENCE or k in NOT_SCIENCE}
    assert "schedule.milestones" in kept and kept["schedule.milestones"] == (80, 140, 180)  # lists as tuples


# ------------------------------------------------------------------------------------ real finished runs


@pytest.fixture(scope="module")
def resubmitted(tmp_path_factory):
    """A sweep trained with 1 epoch (seeds 0, 1), then edited to 2 epochs and submitted again (seeds 0, 1),
    with a run dir of another sweep copied into it."""
    from unittest import mock

    import torch

    from asbatch.train import train

    root = tmp_path_factory.mktemp("runs")
    sweep_dir = root / "edit"
    offline = {"wandb": "offline", "project": "asbatch-tests"}  # what W&B writes is the W&B stand-in's data
    configs = [tiny_digits_config("edit", seed=s, schedule={"name": "cosine", "epochs": e}, adversarial={"lam": 0.0},
                                  tracking=offline) for e in (1, 2) for s in (0, 1)]
    other = tiny_digits_config("other", seed=7, adversarial={"lam": 0.0}, tracking=offline)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread is faster, and much faster on a busy machine
    try:
        with mock.patch.dict(os.environ, {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}):
            for cfg in configs:
                train(cfg, sweep_dir / cfg.run_id)
            train(other, root / "other" / other.run_id)
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(root / "other" / other.run_id, sweep_dir / other.run_id)
    return sweep_dir, configs, other


def test_real_runs_of_an_edited_spec_are_not_pooled_and_another_sweeps_run_is_ignored(resubmitted):
    sweep_dir, configs, other = resubmitted
    records = records_from_run_dirs(sweep_dir)
    assert sorted(r.run_id for r in records) == sorted(c.run_id for c in configs)
    assert records.foreign == {other.run_id: "other"} and records.unfinished == ()
    assert describe(records).endswith("1 run dir(s) of another sweep ignored ('other': 1)")
    table = rows(sweep_tables(records))
    assert [line.split(" | ")[1:3] for line in table[:2]] == [["MLP [schedule.epochs=1]", "2"],
                                                             ["MLP [schedule.epochs=2]", "2"]]
    one_epoch = [r.ensemble for r in records if r.config["schedule.epochs"] == 1]
    assert f"{sum(one_epoch) / 2:.2f} ± " in table[0]
    result = CliRunner().invoke(main, ["table", str(sweep_dir)])
    assert result.exit_code == 0 and "another sweep ignored" in result.output


def test_runs_frame_has_a_row_per_run_with_config_metrics_and_train_summary(resubmitted):
    sweep_dir, configs, _ = resubmitted
    df = runs_frame(sweep_dir)
    assert sorted(df["run_id"]) == sorted(c.run_id for c in configs) and len(df.columns) == len(set(df.columns))
    assert df.attrs["records"].foreign and list(df.columns[:5]) == ["run_id", "experiment", "sweep", "stage", "seed"]
    for row in df.to_dict("records"):
        run_dir = sweep_dir / row["run_id"]
        results = json.loads((run_dir / "results.json").read_text())
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert {k: row[k] for k in flatten_config(results["config"])} == flatten_config(results["config"])
        assert row["ensemble"] == 100 * results["evaluation"]["ensemble_accuracy"]
        assert row["ece"] == results["evaluation"]["ece"] and pd.isna(row["ood_auroc"])
        assert {k: row[f"train.{k}"] for k in last} == last and row["as_on"] is False
    # `experiment` groups exactly as the tables do: two experiments of two seeds each
    assert sorted(df.groupby("experiment")["seed"].apply(sorted)) == [[0, 1], [0, 1]]
    assert df.groupby("experiment")["schedule.epochs"].nunique().max() == 1


def test_runs_frame_from_the_wandb_stand_in_equals_the_one_from_run_dirs(resubmitted):
    from test_results import FakeApi, wandb_run_from_offline_files

    sweep_dir, _, _ = resubmitted
    local = records_from_run_dirs(sweep_dir)
    runs = [wandb_run_from_offline_files(sweep_dir / r.run_id) for r in local]
    moved = wandb_run_from_offline_files(sweep_dir / next(iter(local.foreign)))  # a run of sweep "other" ...
    moved.group = "edit"  # ... moved into this group in the W&B UI
    api = FakeApi([*runs, moved])
    remote = runs_frame(sweep_dir, source="wandb", wandb_path="me/asbatch", api=api)
    assert api.calls == [("me/asbatch", {"group": "edit"})]
    assert remote.equals(records_frame(local))
    assert records_from_wandb(api, "me/asbatch", "edit") == local
    assert remote.attrs["records"].foreign == local.foreign == {moved.id: "other"}


def test_table_per_run_prints_the_frame_in_every_format(resubmitted):
    sweep_dir, configs, _ = resubmitted
    md = CliRunner().invoke(main, ["table", str(sweep_dir), "--per-run"])
    assert md.exit_code == 0, md.output
    lines = [line for line in md.output.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    # only the columns that vary are shown, the config first; metrics with the tables' decimals
    assert header[:4] == ["run\\_id", "experiment", "seed", "schedule.epochs"] and "ensemble" in header
    assert "train.train\\_loss" in header and "model.name" not in header and len(lines) == 2 + len(configs)
    assert "columns with the same value in every run left out" in md.output
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    assert [(c["schedule.epochs"], c["seed"]) for c in cells] == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    frame = records_frame(records_from_run_dirs(sweep_dir)).set_index("run_id")
    for c in cells:
        assert c["ensemble"] == f"{frame.loc[c[header[0]].replace(chr(92), ''), 'ensemble']:.2f}"
    csv_out = CliRunner().invoke(main, ["table", str(sweep_dir), "--per-run", "--format", "csv"])
    parsed = list(csv.DictReader(io.StringIO(csv_out.stdout)))
    assert list(parsed[0]) == list(frame.reset_index().columns) and len(parsed) == len(configs)
    latex = per_run_table(frame.reset_index(), "latex")
    assert r"\begin{tabular}" in latex and r"run\_id" in latex and "schedule.epochs" in latex
    assert "<table" in per_run_table(frame.reset_index(), "html")


def test_the_wandb_report_groups_runs_by_every_key_in_which_experiments_differ():
    """Built, not saved (no W&B server here): its panels must not average runs of different configs either."""
    from asbatch.analysis import build_wandb_report

    records = [run(f"r{s}{e}{lam}{m}", seed=s, **{"schedule.epochs": e, "adversarial.lam": lam, "model.name": m})
               for s in (0, 1) for e in (8, 20) for lam in (0.0, 0.8) for m in ("resnet20", "vgg16")]
    report = build_wandb_report("s", "asbatch", "lab", "| x |", records)
    groupby = report.blocks[-1].runsets[0].groupby
    assert groupby == ["config.adversarial.lam", "config.model.name", "config.schedule.epochs"]
    alone = build_wandb_report("s", "asbatch", "lab", "", [r for r in records if r.config["schedule.epochs"] == 8
                                                          and r.config["model.name"] == "vgg16"])
    assert alone.blocks[-1].runsets[0].groupby == ["config.adversarial.lam"]
    fine = [r for r in fine_tune_records({0: 200, 1: 100}) if r.bayesian]  # per-seed init_from: not a group key
    assert build_wandb_report("s", "asbatch", "lab", "", fine).blocks[-1].runsets[0].groupby == [
        "config.adversarial.lam"]


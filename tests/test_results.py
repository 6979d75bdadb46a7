"""Records, aggregation over seeds and the paper's tables (asbatch.analysis), and W&B vs run-dir records."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from types import SimpleNamespace

import pytest
from tests_support import tiny_digits_config

from asbatch.analysis import (
    DEFAULT_BY,
    Record,
    aggregate,
    csv_columns,
    default_grouping,
    latex_escape,
    paper_tables,
    records_from_run_dirs,
    records_from_wandb,
    sweep_tables,
)
from asbatch.config import RunConfig
from asbatch.tracking.keys import flatten_evaluation, unflatten_evaluation

DEFAULTS = dict(sweep="s", stage="train", lowest=80.0, highest=85.0, mean_acc=82.0, ensemble=86.0,
                retained_20=99.0, retained_40=98.0, retained_60=97.0, retained_80=96.0,
                ece=0.05, nll=0.5, brier=0.2, aurc=0.03)


def rec(run_id: str, data="cifar10", model="resnet20", lam=0.0, fine_tuned=False, seed=0, bayesian=True,
        **metrics) -> Record:
    values = {**DEFAULTS, **metrics}
    return Record(run_id=run_id, data=data, model=model, bayesian=bayesian, lam=lam, as_on=lam > 0,
                  fine_tuned=fine_tuned, seed=seed, **values)


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


# ------------------------------------------------------------------------------------------ aggregate


def test_aggregate_gives_mean_sample_std_and_n_per_group_and_drops_deterministic_runs():
    records = [rec("a0", ensemble=80.0, seed=0), rec("a1", ensemble=82.0, seed=1), rec("a2", ensemble=87.0, seed=2),
               rec("b0", lam=0.8, ensemble=90.0), rec("b1", lam=0.8, ensemble=91.0, seed=1),
               rec("c0", model="vgg16", ensemble=70.0),
               rec("pre", bayesian=False, ensemble=99.0)]
    groups = aggregate(records)
    assert [(g.key["model"], g.key["as_on"], g.n) for g in groups] == [
        ("resnet20", False, 3), ("resnet20", True, 2), ("vgg16", False, 1)]
    plain, with_as, vgg = groups
    assert plain["ensemble"].mean == pytest.approx(83.0)
    assert plain["ensemble"].std == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # ddof=1: sqrt(13)
    assert plain["ensemble"].n == 3 and plain.run_ids == ("a0", "a1", "a2")
    assert with_as["ensemble"] == pytest.approx((90.5, math.sqrt(0.5), 2))
    assert vgg["ensemble"] == (70.0, 0.0, 1)  # one run: std 0
    assert plain["ood_auroc"] == (None, None, 0)
    # with the deterministic run: its own row (a different config), named by the key that differs
    everything = aggregate(records, bayesian_only=False)
    assert [(g.key["model"], g.key["as_on"], g.n, g.differs) for g in everything] == [
        ("resnet20", False, 1, {"model.bayesian": False}), ("resnet20", False, 3, {"model.bayesian": True}),
        ("resnet20", True, 2, {"model.bayesian": True}), ("vgg16", False, 1, {})]


def test_aggregate_by_other_fields_and_per_metric_n():
    records = [rec("a", lam=0.5, ood_auroc=0.9), rec("b", lam=0.8, ood_auroc=0.7), rec("c", lam=0.8, seed=1)]
    by_lam = aggregate(records, by=("model", "lam"))
    assert [(g.key["lam"], g.n) for g in by_lam] == [(0.5, 1), (0.8, 2)]
    assert by_lam[1]["ood_auroc"] == (0.7, 0.0, 1)  # only one of the two runs has it
    # grouped without lambda, runs of two lambdas are still two experiments: never one row of both
    assert [(g.lams, g.n) for g in aggregate(records)] == [((0.5,), 1), ((0.8,), 2)]


# ------------------------------------------------------------------------------------------- tables


def paper_records() -> list[Record]:
    """CIFAR-10 ResNet20 with 2 seeds each: AS better in accuracy; ECE lower (better) with AS, NLL higher
    (worse) with AS, Brier equal."""
    return [
        rec("p0", lowest=82.0, highest=86.0, ensemble=87.0, ece=0.060, nll=0.50, brier=0.2),
        rec("p1", seed=1, lowest=84.0, highest=87.0, ensemble=88.0, ece=0.040, nll=0.52, brier=0.2),
        rec("q0", lam=0.8, lowest=86.0, highest=88.0, ensemble=88.5, ece=0.030, nll=0.60, brier=0.2),
        rec("q1", lam=0.8, seed=1, lowest=87.0, highest=89.0, ensemble=89.5, ece=0.020, nll=0.62, brier=0.2),
    ]


def test_markdown_accuracy_table_has_mean_std_cells_and_bolds_the_better_row():
    text = paper_tables(aggregate(paper_records()), "md")
    lines = table_lines(text)
    assert lines[0] == "| Dataset | Model | n | Lowest Accuracy | Highest Accuracy | Ensembled Accuracy |"
    # no AS: lowest 83 ± sqrt(2) = 1.41, highest 86.5 ± 0.71, ensemble 87.5 ± 0.71; AS: 86.5, 88.5, 89.0
    assert lines[2] == "| CIFAR-10 | ResNet20 | 2 | 83.00 ± 1.41 | 86.50 ± 0.71 | 87.50 ± 0.71 |"
    assert lines[3] == "|  | ResNet20 + AS | 2 | **86.50 ± 0.71** | **88.50 ± 0.71** | **89.00 ± 0.71** |"
    assert "trained from scratch" in text and "Bayesian fine-tune" not in text
    retained_header = next(line for line in lines if "data retained" in line)
    assert "| 20 % data retained | 40 % data retained | 60 % data retained | 80 % data retained |" in retained_header


def test_lower_is_better_metrics_bold_the_lower_value_and_ties_bold_nothing():
    lines = table_lines(paper_tables(aggregate(paper_records()), "md"))
    header = next(line for line in lines if "ECE" in line)
    assert header == "| Dataset | Model | n | ECE | NLL | Brier | AURC |"  # no OOD AUROC column: no run has it
    start = lines.index(header)
    plain, with_as = lines[start + 2], lines[start + 3]
    # ECE 0.05 ± 0.0141 vs 0.025 ± 0.0071: AS lower, bold; NLL 0.51 vs 0.61: no AS lower, bold; Brier, AURC: ties
    assert plain == ("| CIFAR-10 | ResNet20 | 2 | 0.0500 ± 0.0141 | **0.5100 ± 0.0141** | 0.2000 ± 0.0000 "
                     "| 0.0300 ± 0.0000 |")
    assert with_as == ("|  | ResNet20 + AS | 2 | **0.0250 ± 0.0071** | 0.6100 ± 0.0141 | 0.2000 ± 0.0000 "
                       "| 0.0300 ± 0.0000 |")


def test_ood_auroc_column_appears_when_present_and_higher_is_better():
    records = [rec("a", ood_auroc=0.80), rec("b", lam=0.8, ood_auroc=0.85)]
    lines = table_lines(paper_tables(aggregate(records), "md"))
    header = next(line for line in lines if "ECE" in line)
    assert header.endswith("| AURC | OOD AUROC |")
    start = lines.index(header)
    assert lines[start + 2].endswith("| 0.8000 ± 0.0000 |") and lines[start + 3].endswith("| **0.8500 ± 0.0000** |")


def test_rows_follow_the_paper_order_and_pairs_are_compared_within_data_model_and_fine_tune():
    records = [rec("v", model="vgg16", lam=0.8, ensemble=70.0), rec("w", model="vgg16", ensemble=60.0),
               rec("r", data="cifar100", ensemble=50.0), rec("x", data="cifar100", lam=0.8, ensemble=40.0),
               rec("a", ensemble=90.0), rec("b", lam=0.8, ensemble=91.0),
               rec("f", fine_tuned=True, ensemble=95.0), rec("g", fine_tuned=True, lam=0.8, ensemble=94.0)]
    text = paper_tables(aggregate(records), "md")
    scratch, fine = text.split("Bayesian fine-tune", 1)[0], text.split("Bayesian fine-tune", 1)[1]
    first = table_lines(scratch)[2:8]
    assert [line.split(" | ")[:2] for line in first] == [
        ["| CIFAR-10", "ResNet20"], ["| ", "ResNet20 + AS"], ["| ", "VGG16"], ["| ", "VGG16 + AS"],
        ["| CIFAR-100", "ResNet20"], ["| ", "ResNet20 + AS"]]
    assert [line.endswith("** |") for line in first] == [False, True, False, True, True, False]
    ft = table_lines(fine)[2:4]
    assert ft[0].endswith("| **95.00 ± 0.00** |") and ft[1].endswith("| 94.00 ± 0.00 |")


def test_several_lambdas_are_shown_in_the_label_and_the_best_of_them_is_bold():
    records = [rec("a", ensemble=80.0), rec("b", lam=0.5, ensemble=82.0), rec("c", lam=0.8, ensemble=85.0)]
    lines = table_lines(paper_tables(aggregate(records, by=("data", "model", "as_on", "fine_tuned", "lam")), "md"))
    assert lines[3].startswith("|  | ResNet20 + AS (λ = 0.5) | 1 |") and not lines[3].endswith("** |")
    assert lines[4].startswith("|  | ResNet20 + AS (λ = 0.8) | 1 |") and lines[4].endswith("| **85.00 ± 0.00** |")
    assert table_lines(paper_tables(aggregate(records), "md")) == lines  # lambdas are never pooled
    # what `asbatch table` prints splits a lambda sweep by lambda; one AS lambda per model keeps the paper's rows
    assert default_grouping(records) == (*DEFAULT_BY, "lam") and table_lines(sweep_tables(records)) == lines
    assert default_grouping(paper_records()) == DEFAULT_BY
    assert "ResNet20 + AS | 2 |" in sweep_tables(paper_records())


def test_latex_tables_escape_names_and_bold_with_textbf():
    assert latex_escape("a_b & 50% #1 {x} $y ~^\\") == \
        r"a\_b \& 50\% \#1 \{x\} \$y \textasciitilde{}\textasciicircum{}\textbackslash{}"
    records = [rec("a", data="my_set&co", model="net#1%"), rec("b", data="my_set&co", model="net#1%", lam=0.8,
                                                               lowest=90.0)]
    tex = paper_tables(aggregate(records), "latex")
    assert r"my\_set\&co & net\#1\% & 1 & 80.00 $\pm$ 0.00 & 85.00 $\pm$ 0.00 & 86.00 $\pm$ 0.00 \\" in tex
    assert r" & net\#1\% + AS & 1 & \textbf{90.00 $\pm$ 0.00} & 85.00 $\pm$ 0.00 & 86.00 $\pm$ 0.00 \\" in tex
    assert r"20 \% data retained" in tex and r"\caption{Lowest, highest and ensembled accuracy (\%)" in tex
    assert tex.count(r"\begin{tabular}") == 3 and tex.count(r"\end{table}") == 3
    assert "my_set" not in tex and "±" not in tex and "**" not in tex


def test_html_tables_escape_and_bold():
    records = [rec("a", model="<b>"), rec("b", model="<b>", lam=0.8, lowest=90.0)]
    page = paper_tables(aggregate(records), "html")
    assert "<td>&lt;b&gt; + AS</td><td>1</td><td><b>90.00 &plusmn; 0.00</b></td>" in page


def test_csv_has_separate_mean_and_std_columns_and_no_bold():
    groups = aggregate(paper_records())
    text = paper_tables(groups, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    metrics = ["lowest", "highest", "ensemble", "retained_20", "retained_40", "retained_60", "retained_80",
               "ece", "nll", "brier", "aurc"]
    expected = ["dataset", "model", "fine_tuned", "as_on", "lambda", "n",
                *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))]
    assert list(rows[0]) == expected == csv_columns(groups)
    assert [(r["dataset"], r["model"], r["as_on"], r["lambda"], r["n"]) for r in rows] == [
        ("CIFAR-10", "ResNet20", "False", "0", "2"), ("CIFAR-10", "ResNet20", "True", "0.8", "2")]
    assert float(rows[0]["lowest_mean"]) == 83.0 and float(rows[0]["lowest_std"]) == pytest.approx(math.sqrt(2))
    assert float(rows[1]["ece_mean"]) == pytest.approx(0.025) and "*" not in text and "±" not in text
    with_ood = paper_tables(aggregate([rec("a", ood_auroc=0.9)]), "csv")
    assert with_ood.splitlines()[0].endswith("aurc_mean,aurc_std,ood_auroc_mean,ood_auroc_std")


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="fmt must be one of"):
        paper_tables(aggregate(paper_records()), "xlsx")
    with pytest.raises(ValueError, match="needs groups keyed by 'as_on'"):
        paper_tables(aggregate(paper_records(), by=("data", "model")), "md")
    assert "no finished Bayesian runs" in paper_tables([], "md")


# ---------------------------------------------------------------------------------- W&B key scheme


def test_flatten_evaluation_keys_and_round_trip():
    ev = {"lowest_accuracy": 0.8, "sample_accuracies": [0.8, 0.9], "retained_accuracy": {"0.2": 1.0, "1.0": 0.85},
          "score": "entropy", "reliability": {"count": [1, 2]}, "ood_auroc": 0.7}
    flat = flatten_evaluation(ev)
    assert flat == {"evaluation/lowest_accuracy": 0.8, "evaluation/sample_accuracies/0": 0.8,
                    "evaluation/sample_accuracies/1": 0.9, "evaluation/retained_accuracy/0.2": 1.0,
                    "evaluation/retained_accuracy/1.0": 0.85, "evaluation/score": "entropy",
                    "evaluation/ood_auroc": 0.7}
    back = {k: v for k, v in ev.items() if k != "reliability"}
    # other summary keys are ignored; a W&B Table logged under a flattened prefix does not shadow the values
    summary = {**flat, "train_loss": 0.1, "evaluation/sample_accuracies": {"_type": "table-file"}}
    assert unflatten_evaluation(summary) == back
    assert unflatten_evaluation(dict(reversed(list(summary.items())))) == back


# -------------------------------------------------------- run dirs vs W&B, on real (tiny) training runs


def digits_config(**over) -> RunConfig:
    return tiny_digits_config("eq", tracking={"wandb": "offline", "project": "asbatch-tests"}, **over)


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory):
    """Two finished runs tracked by real W&B in offline mode (its files in each run dir), an unfinished run
    dir and a submitted run that never started."""
    from unittest import mock

    import torch

    from asbatch.train import train

    sweep_dir = tmp_path_factory.mktemp("runs") / "eq"
    configs = [digits_config(adversarial={"lam": 0.0}), digits_config(adversarial={"lam": 0.8}, seed=1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread is faster, and much faster on a busy machine
    try:
        with mock.patch.dict(os.environ, {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}):
            for cfg in configs:
                train(cfg, sweep_dir / cfg.run_id)
    finally:
        torch.set_num_threads(threads)
    (sweep_dir / "train-unfinished").mkdir()
    (sweep_dir / "train-unfinished" / "config.yaml").write_text("seed: 0\n")
    (sweep_dir / "manifest.json").write_text(json.dumps(
        {"submissions": [{"run_id": c.run_id} for c in configs] + [{"run_id": "train-notstarted"}]}))
    return sweep_dir, configs


class FakeRun(SimpleNamespace):
    def scan_history(self):
        return iter(self.rows)


class FakeApi:
    """A labelled STAND-IN for `wandb.Api()`: no W&B server runs here, so this offers only what
    `records_from_wandb` uses (`runs(path, filters)` -> runs with id, group, job_type, config, summary,
    scan_history). Its runs hold what W&B itself wrote for each run (`wandb_run_from_offline_files`)."""

    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [r for r in self._runs if r.group == filters["group"]]


def _put(target: dict, item) -> None:
    """One W&B `key` / `nested_key` update with its JSON value into a dict (nested keys become nested dicts,
    as W&B's server keeps them: a logged Table is `{"evaluation/sample_accuracies": {"_type": ...}}`)."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


def wandb_run_from_offline_files(run_dir) -> FakeRun:
    """The run as W&B's API would serve it once synced, read back from the offline `.wandb` files W&B wrote
    in the run dir (not from asbatch's own files): id, group and job type from the run record; config from the
    run and config records without W&B's internal keys (as `wandb.Api().run().config`); summary from every
    summary record in order; history rows from the history records, with their `_step`."""
    from asbatch.rundir import RunDir, offline_segments
    from asbatch.tracking.offline import read_finished_segment, segment_records

    run, config, summary, rows = None, {}, {}, []
    for segment in offline_segments(RunDir(run_dir)):
        assert read_finished_segment(segment).exited, f"{segment}: W&B did not finish writing it"
        for record in segment_records(segment):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                for item in record.run.config.update:
                    _put(config, item)
            elif kind == "config":
                for item in record.config.update:
                    _put(config, item)
            elif kind == "summary":
                for item in record.summary.update:
                    _put(summary, item)
                for item in record.summary.remove:
                    summary.pop(item.key, None)
            elif kind == "history":
                row = {}
                for item in record.history.item:
                    _put(row, item)
                rows.append({**row, "_step": record.history.step.num})
    assert run is not None, f"{run_dir}: no W&B run record"
    config = {k: v for k, v in config.items() if k not in {"_wandb", "wandb_version"}}
    return FakeRun(id=run.run_id, group=run.run_group, job_type=run.job_type, config=config, summary=summary,
                   rows=rows)


def test_run_dirs_and_what_wandb_wrote_give_identical_records(trained_sweep):
    sweep_dir, configs = trained_sweep
    local = records_from_run_dirs(sweep_dir, history=True)
    assert [r.run_id for r in local] == sorted(c.run_id for c in configs)
    assert sorted(local.unfinished) == ["train-notstarted", "train-unfinished"]

    runs = [wandb_run_from_offline_files(sweep_dir / r.run_id) for r in local]
    assert [(r.id, r.group, r.job_type) for r in runs] == [(r.run_id, "eq", "train") for r in local]
    assert all("evaluation/ensemble_accuracy" in r.summary and "_runtime" in r.summary for r in runs)
    assert all(r.summary["evaluation/sample_accuracies"]["_type"] == "table-file" for r in runs)  # a W&B Table
    # history: epoch 1 at its global step (5 steps of 64 images), then the evaluation's tables and images
    assert all([row["_step"] for row in r.rows] == [5, 6] for r in runs)
    other_sweep = FakeRun(**{**vars(runs[0]), "id": "other", "group": "another"})
    still_running = FakeRun(id="train-running", group="eq", job_type="train", config={}, summary={"train_loss": 2.0},
                            rows=[])
    api = FakeApi([*runs, other_sweep, still_running])
    remote = records_from_wandb(api, "me/asbatch", "eq", history=True)
    assert api.calls == [("me/asbatch", {"group": "eq"})]
    assert remote == local
    assert remote.unfinished == ("train-running",)
    assert records_from_wandb(api, "me/asbatch", "eq") == records_from_run_dirs(sweep_dir)  # without history
    assert all(r.history is None for r in records_from_run_dirs(sweep_dir))
    assert [len(r.history) for r in local] == [1, 1] and "train_loss" in local[0].history[0]


def test_wandb_report_holds_the_tables_and_panels_over_the_sweeps_runs():
    """Built, not saved: saving needs a W&B server, which cannot run here."""
    import wandb_workspaces.reports.v2 as wr

    from asbatch.analysis import build_wandb_report

    report = build_wandb_report("c10", project="asbatch", entity="lab", tables_md="| Model | x |\n|--|--|\n")
    assert report.entity == "lab" and report.project == "asbatch" and "c10" in report.title
    markdown = [b for b in report.blocks if isinstance(b, wr.MarkdownBlock)]
    assert markdown and "| Model | x |" in markdown[0].text
    (grid,) = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert grid.runsets[0].filters == "Config('sweep') = 'c10'"
    plotted = {m for p in grid.panels for m in getattr(p, "y", []) + getattr(p, "metrics", [])}
    assert {"test_acc_mean", "evaluation/ensemble_accuracy", "evaluation/lowest_accuracy"} <= plotted

"""The analysis layer end to end on real tiny runs: records from run dirs, the analysis scripts' PNGs, the
per-run plots of the tracker, and the static report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests_support import tiny_digits_config

from asbatch.analysis import RETAINED, aggregate, build_static_report, records_from_run_dirs
from asbatch.config import RunConfig
from asbatch.figures import PNG_MAGIC, reliability_diagram, retained_curve

REPO = Path(__file__).resolve().parents[1]
ANALYSIS = REPO / "analysis"


def digits_config(**over) -> RunConfig:
    return tiny_digits_config("tiny", **over)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Four finished runs (lambda 0 and 0.8, seeds 0 and 1), one epoch each on digits."""
    import torch

    from asbatch.train import train

    sweep_dir = tmp_path_factory.mktemp("runs") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread is faster, and much faster on a busy machine
    try:
        for lam in (0.0, 0.8):
            for seed in (0, 1):
                cfg = digits_config(adversarial={"lam": lam}, seed=seed)
                train(cfg, sweep_dir / cfg.run_id)
    finally:
        torch.set_num_threads(threads)
    return sweep_dir


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def load_script(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ANALYSIS))  # what `python analysis/<name>.py` gets for free
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ANALYSIS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_records_equal_each_runs_results_json(sweep):
    records = records_from_run_dirs(sweep)
    assert len(records) == 4 and records.unfinished == ()
    for r in records:
        res = json.loads((sweep / r.run_id / "results.json").read_text())
        ev, cfg = res["evaluation"], res["config"]
        assert (r.sweep, r.stage, r.data, r.model, r.seed) == ("tiny", "train", "digits", "mlp", cfg["seed"])
        assert r.lam == cfg["adversarial"]["lam"] and r.as_on == (r.lam > 0) and r.bayesian and not r.fine_tuned
        assert r.lowest == 100 * ev["lowest_accuracy"] and r.highest == 100 * ev["highest_accuracy"]
        assert r.ensemble == 100 * ev["ensemble_accuracy"] and r.mean_acc == 100 * ev["mean_accuracy"]
        for frac in RETAINED:
            assert getattr(r, f"retained_{round(100 * float(frac))}") == 100 * ev["retained_accuracy"][frac]
        assert (r.ece, r.nll, r.brier, r.aurc, r.ood_auroc) == (ev["ece"], ev["nll"], ev["brier"], ev["aurc"], None)
        assert r.sample_accuracies == tuple(100 * a for a in ev["sample_accuracies"]) and len(r.sample_accuracies) == 3
    groups = aggregate(records)
    assert [(g.key["as_on"], g.n, g.lams) for g in groups] == [(False, 2, (0.0,)), (True, 2, (0.8,))]
    assert groups[1]["ensemble"].mean == pytest.approx(sum(r.ensemble for r in records if r.as_on) / 2)


@pytest.mark.parametrize("name", ["lambda_influence", "retained_curves", "sample_accuracy_distribution",
                                  "training_curves", "reliability"])
def test_each_figure_script_writes_its_png(sweep, tmp_path, name, monkeypatch):
    path = load_script(name, monkeypatch).main([str(sweep), "--out", str(tmp_path)])
    assert path == tmp_path / f"{name}.png" and is_png(path)


@pytest.mark.parametrize("name", ["lambda_influence", "tables", "report"])
def test_a_script_given_no_sweep_says_so_in_one_line(tmp_path, name):
    result = subprocess.run([sys.executable, str(ANALYSIS / f"{name}.py"), str(tmp_path / "runs" / "train_c10")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: no sweep dir at {tmp_path / 'runs' / 'train_c10'}"], result.stderr


def test_tables_script_prints_the_tables_and_writes_them_with_out(sweep, tmp_path, monkeypatch, capsys):
    module = load_script("tables", monkeypatch)
    text = module.main([str(sweep)])
    assert capsys.readouterr().out == text
    assert "| Digits | MLP | 2 |" in text and "|  | MLP + AS | 2 |" in text and "20 % data retained" in text
    module.main([str(sweep), "--format", "latex", "--out", str(tmp_path)])
    assert r"\begin{tabular}" in (tmp_path / "tables.tex").read_text()


def test_tracker_per_run_plots_write_pngs(sweep, tmp_path):
    run_dir = next(p for p in sweep.iterdir() if (p / "results.json").exists())
    ev = json.loads((run_dir / "results.json").read_text())["evaluation"]
    assert is_png(retained_curve(ev, tmp_path / "retained.png"))
    assert is_png(reliability_diagram(ev, tmp_path / "reliability.png"))
    assert is_png(reliability_diagram({k: v for k, v in ev.items() if k != "reliability"}, tmp_path / "none.png"))


def test_static_report_has_tables_and_figures(sweep):
    html_path = build_static_report(sweep)
    out = sweep / "report"
    assert html_path == out / "report.html"
    md = (out / "report.md").read_text()
    assert "| Digits | MLP | 2 |" in md and "Lowest Accuracy" in md and "4 finished runs" in md
    assert "± 1 sample std over those seeds" in md and "checkpoint_every" in md  # what n and ± are, what is pooled
    for name in ("training_curves", "lambda_influence", "retained_curves", "reliability",
                 "sample_accuracy_distribution"):
        assert f"({name}.png)" in md and is_png(out / f"{name}.png")
    assert md.index("Training: loss and test accuracy") < md.index("Reliability diagrams")
    page = html_path.read_text()
    assert page.count('<table class="paper">') == 3  # accuracy, retained, calibration
    assert page.count("data:image/png;base64,") == 5 and "MLP + AS" in page
    assert records_from_run_dirs(sweep).unfinished == ()  # the report dir is not taken for a run


def test_training_curves_and_reliability_come_from_each_runs_own_files(sweep):
    from asbatch.analysis import reliability_figure, training_curves_figure

    records = records_from_run_dirs(sweep, history=True)
    loss_ax = training_curves_figure(records).axes[0]
    curves = {line.get_label(): list(line.get_ydata()) for line in loss_ax.get_lines() if len(line.get_xdata())}
    for as_on, label in ((False, "no AS, n = 2 seeds"), (True, "AS (λ = 0.8), n = 2 seeds")):
        rows = [json.loads((sweep / r.run_id / "metrics.jsonl").read_text()) for r in records if r.as_on == as_on]
        assert curves[label] == pytest.approx([sum(row["train_loss"] for row in rows) / 2])  # one epoch each
    rel_ax = reliability_figure(records).axes[0]
    counts = [sum(json.loads((sweep / r.run_id / "results.json").read_text())["evaluation"]["reliability"]["count"])
              for r in records]
    assert counts == [360] * 4 and len([line for line in rel_ax.get_lines() if line.get_marker() == "o"]) == 2


def test_report_script_runs_as_a_command(sweep, tmp_path):
    proc = subprocess.run([sys.executable, str(ANALYSIS / "report.py"), str(sweep), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "report.html") and (tmp_path / "report.md").exists()
    assert "tiny: 4 finished runs" in proc.stderr

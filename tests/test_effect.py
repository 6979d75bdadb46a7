"""The line `asbatch run` prints under its table: AS against lambda = 0, differences of means over seeds."""

from __future__ import annotations

import math

from asbatch.analysis.effect import as_effect_lines
from asbatch.analysis.records import Record

METRICS = dict(mean_acc=82.0, retained_20=99.0, retained_40=98.0, retained_60=97.0, retained_80=96.0, ece=0.05,
               nll=0.5, brier=0.2, aurc=0.03)


def rec(seed: int, lam: float, lowest: float, highest: float, ensemble: float, variant: str = "paper") -> Record:
    return Record(run_id=f"r{lam}{seed}{variant}", sweep="s", stage="train", data="digits_0to7", model="resnet20",
                  bayesian=True, lam=lam, as_on=lam > 0, fine_tuned=False, seed=seed, variant=variant,
                  lowest=lowest, highest=highest, ensemble=ensemble, **METRICS)


def test_line_gives_differences_of_means_and_their_standard_errors():
    records = [rec(0, 0.0, 80.0, 90.0, 91.0), rec(1, 0.0, 82.0, 90.0, 93.0),
               rec(0, 0.8, 85.0, 91.0, 92.0), rec(1, 0.8, 89.0, 91.0, 94.0)]
    (line,) = as_effect_lines(records)
    # lowest: 87 - 81 = +6, se sqrt(8/2 + 2/2); spread: mean(6, 2) - mean(10, 8) = -5, se sqrt(8/2 + 2/2)
    assert line.startswith("AS (lambda 0.8) vs lambda 0, Digits 0-7 / ResNet20, 2 seeds: ")
    assert f"lowest +6.0 ± {math.sqrt(5):.1f}" in line
    assert f"spread -5.0 ± {math.sqrt(5):.1f}" in line
    assert "ensembled +1.0 ± 1.4" in line


def test_one_line_per_variant_and_none_without_a_lambda_zero_baseline():
    records = [rec(0, 0.0, 80.0, 90.0, 91.0), rec(0, 0.8, 85.0, 91.0, 92.0),
               rec(0, 0.0, 70.0, 90.0, 91.0, "reference"), rec(0, 0.8, 60.0, 91.0, 92.0, "reference")]
    lines = as_effect_lines(records)
    assert len(lines) == 2 and "paper variant" in lines[0] and "reference variant" in lines[1]
    assert "lowest -10.0, spread +11.0, ensembled +1.0 points (difference of means; one run on a side: no " \
           "standard error, run more seeds)" in lines[1], "never a '± 0.0' that reads as certainty"
    assert as_effect_lines([rec(0, 0.8, 85.0, 91.0, 92.0)]) == []


def test_asbatch_run_prints_the_line_under_its_table(tmp_path):
    import subprocess
    import sys

    import yaml

    spec = {"sweep": "effect", "defaults": {
        "cpu": True, "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 256},
        "model": {"name": "mlp", "width": 16, "init_sigma": 0.01}, "schedule": {"name": "constant", "epochs": 1},
        "eval": {"num_samples": 3}}, "grid": {"adversarial.lam": [0.0, 0.8], "seed": [0, 1]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "asbatch", "run", str(path), "--runs-root", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("AS (lambda 0.8) vs lambda 0")]
    assert len(lines) == 1 and "Digits / MLP, 2 seeds: lowest " in lines[0], proc.stdout[-2000:]

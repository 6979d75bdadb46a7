"""End to end, as a user meets it: `asbatch submit jobs/quickstart.yaml` on the real local Slurm cluster with
W&B in real offline mode, then `asbatch table quickstart` prints numbers equal to the runs' results.json."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def asbatch(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asbatch", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_submit_quickstart_then_table_matches_results_json(local_slurm, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ASBATCH_RUNS": str(tmp_path / "runs")}
    submitted = asbatch("submit", str(REPO / "jobs" / "quickstart.yaml"), "--executor", "slurm", env=env)
    assert submitted.returncode == 0, submitted.stderr
    sweep_dir = tmp_path / "runs" / "quickstart"
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    run_ids = {r["run_id"] for r in manifest["submissions"]}
    assert len(run_ids) == 6

    deadline = time.monotonic() + 900
    while not all((sweep_dir / r / "results.json").exists() for r in run_ids):
        assert time.monotonic() < deadline, asbatch("status", "quickstart", env=env).stdout
        time.sleep(5)

    results = [json.loads((sweep_dir / r / "results.json").read_text()) for r in run_ids]
    for r in results:  # one offline W&B run per training run, its id the run id
        segments = list((sweep_dir / r["run_id"] / "wandb").glob(f"offline-run-*-{r['run_id']}"))
        assert segments, f"no offline W&B run for {r['run_id']}"

    table = asbatch("table", "quickstart", "--format", "csv", env=env)
    assert table.returncode == 0, table.stderr
    rows = {row["as_on"]: row for row in csv.DictReader(io.StringIO(table.stdout))}
    for as_on, lam in (("False", 0.0), ("True", 0.8)):
        mine = [r["evaluation"] for r in results if r["config"]["adversarial"]["lam"] == lam]
        for column, key in (("lowest", "lowest_accuracy"), ("highest", "highest_accuracy"),
                            ("ensemble", "ensemble_accuracy")):
            assert float(rows[as_on][f"{column}_mean"]) == pytest.approx(
                statistics.mean(100 * e[key] for e in mine), abs=1e-9)
        for frac in ("20", "40", "60", "80"):
            assert float(rows[as_on][f"retained_{frac}_mean"]) == pytest.approx(
                statistics.mean(100 * e["retained_accuracy"][f"0.{frac[0]}"] for e in mine), abs=1e-9)
    md = asbatch("table", "quickstart", env=env).stdout
    assert "Lowest Accuracy" in md and "20 % data retained" in md
    report = asbatch("report", "quickstart", env=env)
    assert report.returncode == 0, report.stderr
    page = Path(report.stdout.strip())
    assert page.is_file() and "Lowest Accuracy" in page.read_text()

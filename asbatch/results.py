"""Reading finished runs (run dirs) and turning them into rows and tables."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.table import Table

RETAINED = ("0.2", "0.4", "0.6", "0.8")


def load_results(run_dir: Path) -> dict[str, Any] | None:
    """The run's results.json, or None while it has not finished."""
    path = Path(run_dir) / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_row(results: dict[str, Any]) -> dict[str, Any]:
    """One flat record per run: identity columns and the paper's metrics (accuracies in %)."""
    cfg, ev = results["config"], results["evaluation"]
    row = {
        "run": results["run_id"], "stage": results["stage"], "data": cfg["data"]["name"],
        "model": cfg["model"]["name"], "bayesian": cfg["model"]["bayesian"],
        "lam": cfg["adversarial"]["lam"] if cfg["model"]["bayesian"] else None, "seed": cfg["seed"],
        "lowest": 100 * ev["lowest_accuracy"], "highest": 100 * ev["highest_accuracy"],
        "ensemble": 100 * ev["ensemble_accuracy"],
    }
    for frac in RETAINED:
        row[f"retained_{frac}"] = 100 * ev["retained_accuracy"][frac]
    return row


def run_table(results: Iterable[dict[str, Any]], title: str = "runs") -> Table:
    """Per-run table: lowest / highest / ensembled accuracy and accuracy on the X% most certain data."""
    table = Table(title=title)
    for col in ("run", "model", "lambda", "seed", "lowest", "highest", "ensembled",
                *(f"{int(float(f) * 100)}% kept" for f in RETAINED)):
        table.add_column(col, justify="left" if col in ("run", "model") else "right", no_wrap=True)
    for r in map(run_row, results):
        lam = "-" if r["lam"] is None else f"{r['lam']:g}"
        table.add_row(r["run"], r["model"], lam, str(r["seed"]), f"{r['lowest']:.2f}", f"{r['highest']:.2f}",
                      f"{r['ensemble']:.2f}", *(f"{r[f'retained_{f}']:.2f}" for f in RETAINED))
    return table

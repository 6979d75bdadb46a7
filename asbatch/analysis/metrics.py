"""The metric registry: one entry per evaluation number, saying where it is, how it is shown and which way is better.

Everything downstream reads this table: records (which values a `Record` carries, scaled), aggregation (a
`Stat` per metric), the paper's tables (columns, headers, decimals, the bolding direction), the per-run table
of `asbatch run`, the figures' axis labels and the W&B report's panels (`Metric.wandb_key`). A new metric is
one more `Metric(...)` line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asbatch.tracking.keys import flatten_evaluation


@dataclass(frozen=True)
class Metric:
    """One number of a run's evaluation (asbatch.evaluate) and how the analysis shows it."""

    name: str                  # attribute of a Record, key of Group.stats, CSV columns <name>_mean / <name>_std
    key: tuple[str, ...]       # path in the evaluation dict, e.g. ("retained_accuracy", "0.2")
    header: str                # column header in the paper's tables (or axis label)
    scale: int = 1             # shown value = scale * evaluation value (100: accuracies in %)
    decimals: int = 4          # digits shown in the tables
    higher_is_better: bool = True  # the direction in which a table cell is bold
    table: str | None = None   # name of the paper table (PAPER_TABLES) it is a column of; None: in none
    short: str | None = None   # column header in the per-run table of `asbatch run`; None: not shown there
    optional: bool = False     # may be missing from an evaluation (e.g. no OOD data set): None then

    def read(self, evaluation: Mapping[str, Any]) -> float | None:
        """The scaled value in an evaluation dict (KeyError when a non-optional metric is missing)."""
        value: Any = evaluation
        for part in self.key:
            value = value.get(part) if self.optional else value[part]
            if value is None:
                return None
        return float(self.scale * value)

    def read_all(self, evaluation: Mapping[str, Any]) -> tuple[float, ...]:
        """The scaled values of a per-sample list (e.g. `sample_accuracies`)."""
        values: Any = evaluation
        for part in self.key:
            values = values[part]
        return tuple(float(self.scale * v) for v in values)

    @property
    def wandb_key(self) -> str:
        """Its key in a W&B run summary, by the scheme of asbatch.tracking.keys (`evaluation/...`)."""
        nested: Any = 0.0
        for part in reversed(self.key):
            nested = {part: nested}
        (key,) = flatten_evaluation(nested)
        return key


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's tables: its columns are the metrics whose `table` is its name, in registry order."""

    name: str
    title: str
    wandb_panel: str | None  # title of its bar panel in the W&B report; None: no panel


PAPER_TABLES: tuple[PaperTable, ...] = (
    PaperTable("accuracy", "Lowest, highest and ensembled accuracy (%)", "Lowest / highest / ensembled accuracy"),
    PaperTable("retained", "Ensembled accuracy (%) on the most certain part of the test data", None),
    PaperTable("calibration", "Calibration, selective prediction and OOD detection", "Calibration"),
)

RETAINED: tuple[str, ...] = ("0.2", "0.4", "0.6", "0.8")  # fractions of the most certain test data in the table


def _percent(name: str, key: tuple[str, ...], header: str, table: str | None, short: str | None) -> Metric:
    return Metric(name, key, header, scale=100, decimals=2, table=table, short=short)


def _retained(fraction: str) -> Metric:
    percent = round(100 * float(fraction))
    return _percent(f"retained_{percent}", ("retained_accuracy", fraction), f"{percent} % data retained",
                    "retained", f"{percent}% kept")


METRICS: tuple[Metric, ...] = (
    _percent("lowest", ("lowest_accuracy",), "Lowest Accuracy", "accuracy", "lowest"),
    _percent("highest", ("highest_accuracy",), "Highest Accuracy", "accuracy", "highest"),
    _percent("mean_acc", ("mean_accuracy",), "Mean Accuracy", None, None),
    _percent("ensemble", ("ensemble_accuracy",), "Ensembled Accuracy", "accuracy", "ensembled"),
    *(_retained(fraction) for fraction in RETAINED),
    Metric("ece", ("ece",), "ECE", higher_is_better=False, table="calibration"),
    Metric("nll", ("nll",), "NLL", higher_is_better=False, table="calibration"),
    Metric("brier", ("brier",), "Brier", higher_is_better=False, table="calibration"),
    Metric("aurc", ("aurc",), "AURC", higher_is_better=False, table="calibration"),
    Metric("ood_auroc", ("ood_auroc",), "OOD AUROC", table="calibration", optional=True),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}

# Not a column: one accuracy per weight sample of a run (Record.sample_accuracies, pooled in Group).
SAMPLE_ACCURACIES = Metric("sample_accuracies", ("sample_accuracies",), "accuracy of one weight sample (%)",
                           scale=100, decimals=2)


def table_metrics(table: str) -> tuple[Metric, ...]:
    """The columns of a paper table, in registry order."""
    return tuple(m for m in METRICS if m.table == table)


def run_table_metrics() -> tuple[Metric, ...]:
    """The metric columns of the per-run table of `asbatch run`."""
    return tuple(m for m in METRICS if m.short is not None)

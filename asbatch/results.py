"""A sweep's results as a pandas DataFrame, one row per finished run: for notebooks and `asbatch table --per-run`.

    from asbatch.results import runs_frame
    df = runs_frame("runs/train_c10")            # or runs_frame("runs/train_c10", source="wandb")
    df.groupby(["experiment", "model.name", "adversarial.lam"])["ensemble"].agg(["mean", "std", "count"])

Columns, in this order: `run_id`; `experiment` (a name of the run's experiment config: runs with the same
`experiment` differ only in their seed or in keys that do not change the science, see
`asbatch.analysis.configs.NOT_SCIENCE`; group by it and you never pool different configs); the resolved config
flattened with dotted names (`seed`, `schedule.epochs`, `adversarial.lam`, ...); `as_on` and `fine_tuned`;
every evaluation metric of the registry (`asbatch.analysis.metrics`, scaled as the tables show them:
accuracies in %); the train summary as `train.<key>` (the last epoch's row: `train.train_loss`,
`train.test_acc_mean`, `train.images_per_s`, ...). Runs come from run dirs or W&B, as `asbatch table` reads
them (`asbatch.analysis.load_records`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asbatch.analysis import METRICS, Record, experiments, load_records
from asbatch.analysis.configs import experiment_id, show_value
from asbatch.analysis.metrics import BY_NAME
from asbatch.analysis.tables import FORMATS, STYLES, Column, Row, Section, render
from asbatch.names import sort_key

IDENTITY = ("run_id", "experiment")
TRAIN_PREFIX = "train."


def _identity_config(r: Record) -> dict[str, Any]:
    """The config columns a record always has (also when it was built without its config)."""
    return {"sweep": r.sweep, "stage": r.stage, "seed": r.seed, "data.name": r.data, "model.name": r.model,
            "model.bayesian": r.bayesian, "adversarial.lam": r.lam}


def records_frame(records: Sequence[Record]):
    """One row per record (see the module doc for the columns), in the order of `records`."""
    import pandas as pd

    records = list(records)
    rows = []
    for r, experiment in zip(records, experiments(records), strict=True):
        row: dict[str, Any] = {"run_id": r.run_id, "experiment": experiment_id(experiment)}
        row.update({**_identity_config(r), **r.config})
        row.update(as_on=r.as_on, fine_tuned=r.fine_tuned, **r.metrics)
        row.update({TRAIN_PREFIX + k: v for k, v in r.train.items()})
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    metric_columns = [m.name for m in METRICS]
    train_columns = [c for c in columns if c.startswith(TRAIN_PREFIX) and c not in metric_columns]
    first = [c for c in columns if c not in metric_columns and c not in train_columns]
    return pd.DataFrame(rows, columns=[*first, *metric_columns, *train_columns])


def runs_frame(sweep_dir: str | Path, source: str = "local", wandb_path: str | None = None, api: Any = None):
    """The DataFrame of a sweep's finished runs, from its run dirs (`source="local"`) or W&B (`source="wandb"`;
    `wandb_path` "entity/project", `api` a `wandb.Api()`, both with defaults as `load_records`). The
    `RecordList` read is in `frame.attrs["records"]` (its `.unfinished` and `.foreign` say what was skipped)."""
    records = load_records(sweep_dir, source=source, wandb_path=wandb_path, api=api)
    frame = records_frame(records)
    frame.attrs["records"] = records
    return frame


# ------------------------------------------------------------------------------------------ as a table


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> bool:
    return _missing(value) or (isinstance(value, int | float) and not isinstance(value, bool))


def _cell(column: str, value: Any) -> str:
    if _missing(value):
        return ""
    metric = BY_NAME.get(column)
    if metric is not None:
        return f"{value:.{metric.decimals}f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return show_value(value)


def _varies(frame, column: str) -> bool:
    return len({repr(v) for v in frame[column]}) > 1


def per_run_table(frame, fmt: str = "md", title: str = "Runs") -> str:
    """The frame as text. csv: every column, full precision (pandas `to_csv`). md / latex / html: a row per run
    (sorted by the config columns that vary, then the seed), the columns whose value is not the same in all
    runs (plus run_id and experiment), metrics with the registry's decimals; the caption says how many
    columns were left out."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "csv":
        return frame.to_csv(index=False)
    if frame.empty:
        return "(no finished runs)\n"
    shown = [c for c in frame.columns if c in IDENTITY or (len(frame) > 1 and _varies(frame, c)) or len(frame) == 1]
    left_out = len(frame.columns) - len(shown)
    order = [c for c in shown if c not in (*IDENTITY, "seed") and c not in BY_NAME and not c.startswith(TRAIN_PREFIX)]
    order.append("seed")
    records = frame.to_dict("records")
    kinds = {"data.name": "data", "model.name": "model"}  # in the paper's order, as the tables
    records.sort(key=lambda row: tuple(sort_key(kinds.get(c, c), None if _missing(row[c]) else row[c]) for c in order))
    rows = tuple(Row(tuple(_cell(c, row[c]) for c in shown)) for row in records)
    note = (f"one row per run; {left_out} columns with the same value in every run left out "
            "(--format csv has every column)" if left_out else "one row per run")
    columns = tuple(Column(c, left=not all(_number(v) for v in frame[c])) for c in shown)
    return render(Section(title, columns, rows, note), STYLES[fmt]) + "\n"

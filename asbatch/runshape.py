"""What the files of a run dir must hold to be read: the shape checks behind `RunDir`'s readers, and how a
per-epoch row's test accuracy is read (one rule for progress, status, curves and the trainer).

A file that parses but does not hold what asbatch writes there (hand-edited, cut short, another tool's) is a
`RunDirError` naming the file and what is wrong, so every command says it in one line (exit 2) instead of
failing deeper with a foreign exception. Which file is which is asbatch.rundir's business: these take the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunDirError(ValueError):
    """A file of a run or sweep dir is damaged; the message names the file."""


def epoch_test_acc(row: dict[str, Any]) -> float | None:
    """A per-epoch metrics row's test accuracy: with the mean weights for a Bayesian net, else the plain one."""
    return row.get("test_acc_mean", row.get("test_acc"))


def damaged(path: Path, what: str, problem: str) -> RunDirError:
    """A file that parses but does not hold what asbatch writes there (hand-edited, or another tool's)."""
    return RunDirError(f"{path}: damaged {what} ({problem})")


def _kind(value: Any) -> str:
    names = {type(None): "null", bool: "true / false", dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bad_leaf(value: Any, where: str, allowed=_is_number) -> str | None:
    """Where in a nested JSON value a leaf is not a number (or null); None when all are."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None if value is None or allowed(value) else f"{where}: expected a number, got {_kind(value)}"
    for key, item in items:
        sep = "" if str(key).startswith("[") else "."
        if problem := _bad_leaf(item, f"{where}{sep}{key}", allowed):
            return problem
    return None


# Sections every written run config has had since the first version: a file without one was cut short.
CONFIG_SECTIONS = ("data", "model", "optim", "schedule", "adversarial", "eval", "tracking")
RESULTS_TEXT = ("score",)  # the evaluation's only text values; the rest of it and all of timing are numbers


def check_results(path: Path, data: Any) -> dict[str, Any]:
    """A run's results as its readers index it: an object whose run_id / sweep / stage are text, config /
    evaluation / timing / train objects, with numbers where numbers belong; else a RunDirError naming what is
    wrong. (What a reader needs to be there, it checks itself: `status` needs less than a table row.)"""
    if not isinstance(data, dict):
        raise damaged(path, "results", f"expected a JSON object, got {_kind(data)}")
    for key in ("run_id", "sweep", "stage", "config", "evaluation", "timing", "train"):
        want = str if key in ("run_id", "sweep", "stage") else dict
        if key in data and not isinstance(data[key], want):
            want_text = "text" if want is str else "an object"
            raise damaged(path, "results", f"{key}: expected {want_text}, got {_kind(data[key])}")
    numbers = {k: v for k, v in data.get("evaluation", {}).items() if k not in RESULTS_TEXT}
    if problem := _bad_leaf(numbers, "evaluation") or _bad_leaf(data.get("timing"), "timing"):
        raise damaged(path, "results", problem)
    return data


def check_metrics_row(path: Path, number: int, row: Any) -> dict[str, Any]:
    """One per-epoch metrics line as its readers index it: an object with whole-number epoch and global_step and
    numbers (or null) for the rest."""
    if not isinstance(row, dict):
        raise damaged(path, "metrics", f"line {number}: expected a JSON object, got {_kind(row)}")
    for key in ("epoch", "global_step"):
        if not (isinstance(row.get(key), int) and not isinstance(row[key], bool) and row[key] >= 0):
            problem = "missing" if key not in row else f"expected a whole number >= 0, got {row[key]!r}"
            raise damaged(path, "metrics", f"line {number}: {key}: {problem}")
    for key, value in row.items():
        if problem := _bad_leaf(value, str(key)):
            raise damaged(path, "metrics", f"line {number}: {problem}")
    return row


def check_config(path: Path, data: Any, complete: bool) -> dict[str, Any]:
    """A run's config as its readers index it: a mapping whose sections are mappings; `complete`: with every
    section (what `train` writes; one cut short names the first missing)."""
    if not isinstance(data, dict):
        raise damaged(path, "config", f"expected a mapping, got {_kind(data)}")
    for key in CONFIG_SECTIONS:
        if (complete or key in data) and not isinstance(data.get(key), dict):
            problem = "missing (cut short?)" if key not in data else f"expected a mapping, got {_kind(data[key])}"
            raise damaged(path, "config", f"{key}: {problem}")
    return data

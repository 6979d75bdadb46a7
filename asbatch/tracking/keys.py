"""The W&B key scheme: how a run's evaluation is stored in its W&B summary, and read back.

A run's evaluation is stored under `evaluation/<name>`, nested dicts and lists flattened with "/"
(`evaluation/retained_accuracy/0.2`, `evaluation/sample_accuracies/0`), so every summary value is a plain
scalar that W&B keeps exactly. History rows are logged with step = the global step. Writer:
`asbatch.tracking.Tracker`; reader: `asbatch.analysis` (records from the W&B API).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EVAL_PREFIX = "evaluation/"
NOT_IN_SUMMARY = frozenset({"reliability"})  # bulky per-bin lists; the tracker logs the diagram as an image


def flatten_evaluation(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B summary entries of an evaluation dict: `evaluation/<name>` for every scalar; nested dicts and
    lists are flattened with "/" (`evaluation/retained_accuracy/0.2`, `evaluation/sample_accuracies/0`), so
    every summary value is a plain scalar (W&B keeps them exactly). `reliability` is left out."""
    out: dict[str, Any] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}/{i}", v)
        else:
            out[key] = value

    for name, value in evaluation.items():
        if name not in NOT_IN_SUMMARY:
            walk(EVAL_PREFIX + name, value)
    return out


class _Node(dict):
    """A container built by `unflatten_evaluation` (so that a dict-valued leaf is not mistaken for one)."""


def unflatten_evaluation(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_evaluation`: the evaluation dict from a W&B summary (other keys are ignored).

    A level whose keys are all digits becomes a list. Where a key is both a value and a prefix of other keys
    (e.g. a W&B Table logged as `evaluation/sample_accuracies` beside `evaluation/sample_accuracies/0`), the
    flattened entries win."""
    root = _Node()
    for key in sorted(k for k in summary if isinstance(k, str) and k.startswith(EVAL_PREFIX)):
        parts = key[len(EVAL_PREFIX):].split("/")
        node = root
        for part in parts[:-1]:
            if not isinstance(node.get(part), _Node):
                node[part] = _Node()  # replaces a leaf that also served as a prefix
            node = node[part]
        if not isinstance(node.get(parts[-1]), _Node):
            node[parts[-1]] = summary[key]

    def plain(value: Any) -> Any:
        if not isinstance(value, _Node):
            return value
        if value and all(k.isdigit() for k in value):
            return [plain(value[k]) for k in sorted(value, key=int)]
        return {k: plain(v) for k, v in value.items()}

    return plain(root)

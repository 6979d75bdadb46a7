"""What the group figures share: panels per (data, model, fine-tune), group labels and colours, the spread note.

Every figure of `asbatch.analysis` labels a group the same way ("AS (λ = 0.8) [schedule.epochs=20], n = 3
seeds"), colours it with the one colour function (`asbatch.figures.method_color`: red with AS, blue without)
and says what its error bars or bands are (`SPREAD`: ± 1 std over the seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asbatch.analysis.aggregate import Group
from asbatch.analysis.configs import show_value
from asbatch.figures import method_color
from asbatch.names import dataset_title, model_title

NO_RUNS = "no finished Bayesian runs"
SPREAD = "mean ± 1 std over n seeds"  # what every error bar and band of the group figures is

Panel = tuple[Any, Any, Any]  # (data, model, fine_tuned)


def grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    """(rows, columns) of a grid of `n` panels."""
    cols = min(max(n, 1), max_cols)
    return -(-max(n, 1) // cols), cols


def panel_title(data: str, model: str | None, fine_tuned: Any) -> str:
    parts = [dataset_title(data)] + ([model_title(model)] if model is not None else [])
    return " ".join(parts) + (", Bayesian fine-tune" if fine_tuned else "")


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def differs_text(group: Group) -> str:
    """" [schedule.epochs=20]": the config keys in which it differs from the groups it is compared with."""
    if not group.differs:
        return ""
    return " [" + ", ".join(f"{k}={show_value(v)}" for k, v in group.differs.items()) + "]"


def uses_as(group: Group) -> bool:
    """Were its runs trained with Adversarial Sampling (lambda > 0)? (Also where `as_on` is not a `by` field.)"""
    return bool(group.get("as_on")) if "as_on" in group.key else any(lam > 0 for lam in group.lams)


def method_label(group: Group) -> str:
    """"no AS" or "AS (λ = 0.8)", and the config keys in which it differs."""
    if not uses_as(group):
        return "no AS" + differs_text(group)
    return f"AS (λ = {', '.join(f'{v:g}' for v in group.lams)})" + differs_text(group)


def group_label(group: Group, seeds: int | None = None) -> str:
    """The legend entry of a group: its method label and its number of seeds."""
    return f"{method_label(group)}, n = {count(group.n if seeds is None else seeds, 'seed')}"


def group_colors(groups: Sequence[Group]) -> list[str | tuple]:
    """A colour per group of one panel: `method_color`, in shades where a method has several groups."""
    kinds = [uses_as(g) for g in groups]
    seen = {True: 0, False: 0}
    colors = []
    for as_on in kinds:
        colors.append(method_color(as_on, seen[as_on], kinds.count(as_on)))
        seen[as_on] += 1
    return colors


def panels(groups: Sequence[Group]) -> list[Panel]:
    return list(dict.fromkeys((g.get("data"), g.get("model"), g.get("fine_tuned")) for g in groups))


def in_panel(groups: Sequence[Group], panel: Panel) -> list[Group]:
    """The groups of a (data, model, fine-tune) panel: no AS first, then AS by lambda."""
    return sorted((g for g in groups if (g.get("data"), g.get("model"), g.get("fine_tuned")) == panel),
                  key=lambda g: (uses_as(g), g.lams))


def hide_unused(axes, used: int, nrows: int, ncols: int) -> None:
    for j in range(used, nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")

"""Aggregation of records over seeds: groups of runs sharing a configuration, and each metric's mean, std and n."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from asbatch.analysis.metrics import METRICS
from asbatch.analysis.records import Record
from asbatch.names import sort_key

DEFAULT_BY = ("data", "model", "as_on", "fine_tuned")


class Stat(NamedTuple):
    """A metric over the runs of a group: mean, sample std (ddof=1; 0.0 for one run), number of runs that
    have it (mean and std are None when none does)."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Group:
    """The runs sharing the values of the `by` fields (`key`), and their metric statistics."""

    key: dict[str, Any]
    n: int
    run_ids: tuple[str, ...]
    lams: tuple[float, ...]  # the distinct lambdas among the runs, ascending
    stats: dict[str, Stat]   # by metric name (asbatch.analysis.metrics)
    sample_accuracies: tuple[float, ...] = field(default=())  # every run's per-sample accuracies, pooled (%)

    def __getitem__(self, metric: str) -> Stat:
        return self.stats[metric]

    def get(self, name: str, default: Any = None) -> Any:
        return self.key.get(name, default)


def stat(values: Sequence[float | None]) -> Stat:
    """`Stat` of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


def aggregate(records: Iterable[Record], by: Sequence[str] = DEFAULT_BY, bayesian_only: bool = True) -> list[Group]:
    """Group records by the values of the `by` fields and compute each metric's mean, std (ddof=1) and n.

    Deterministic runs (e.g. the pretrain stage of a fine-tune sweep) are left out unless `bayesian_only` is
    False: the paper's tables compare Bayesian networks. Groups are ordered by `by` (data sets and models in
    the paper's order, False before True)."""
    buckets: dict[tuple, list[Record]] = {}
    for r in records:
        if bayesian_only and not r.bayesian:
            continue
        buckets.setdefault(tuple(getattr(r, f) for f in by), []).append(r)
    groups = []
    for key in sorted(buckets, key=lambda k: tuple(sort_key(f, v) for f, v in zip(by, k, strict=True))):
        rs = buckets[key]
        groups.append(Group(
            key=dict(zip(by, key, strict=True)), n=len(rs), run_ids=tuple(r.run_id for r in rs),
            lams=tuple(sorted({r.lam for r in rs})),
            stats={m.name: stat([r.metrics[m.name] for r in rs]) for m in METRICS},
            sample_accuracies=tuple(a for r in rs for a in r.sample_accuracies)))
    return groups


def default_grouping(records: Iterable[Record]) -> tuple[str, ...]:
    """`DEFAULT_BY`, plus "lam" when some (data, model, fine-tune) has Bayesian AS runs with different lambdas
    (a lambda sweep), plus "variant" when the runs use more than one AS variant: averaging over either would
    mix different methods."""
    records = list(records)
    lams: dict[tuple, set[float]] = {}
    for r in records:
        if r.bayesian and r.as_on:
            lams.setdefault((r.data, r.model, r.fine_tuned), set()).add(r.lam)
    by = (*DEFAULT_BY, "lam") if any(len(v) > 1 for v in lams.values()) else DEFAULT_BY
    return (*by, "variant") if len({r.variant for r in records if r.bayesian}) > 1 else by

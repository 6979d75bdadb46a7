"""Aggregation of records over seeds: groups of runs of one experiment, and each metric's mean, std and n seeds.

A group is the runs that share the values of the `by` fields AND one experiment config (the resolved config
minus the seed and the keys of `asbatch.analysis.configs.NOT_SCIENCE`): runs of different configs are never
averaged as seeds. Where rows that a table compares (same `by` values but AS on/off and lambda) have
different configs, each group names the keys that differ (`Group.differs`, e.g. {"schedule.epochs": 8}).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from asbatch.analysis.configs import MISSING, differing_keys, experiment_config
from asbatch.analysis.metrics import METRICS
from asbatch.analysis.records import Record
from asbatch.names import sort_key

DEFAULT_BY = ("data", "model", "as_on", "fine_tuned")
COMPARED = ("as_on", "lam")         # rows that differ only in these are compared with each other (a "family")
SHOWN_KEYS = ("adversarial.lam",)   # the row label shows lambda itself: not named again among the differing keys


class Stat(NamedTuple):
    """A metric over the seeds of a group: mean, sample std (ddof=1; 0.0 for one seed), number of seeds that
    have it (mean and std are None when none does). Runs repeating a seed are averaged first."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Group:
    """The runs of one experiment sharing the values of the `by` fields (`key`), and their metric statistics."""

    key: dict[str, Any]
    n: int                   # number of seeds
    run_ids: tuple[str, ...]
    lams: tuple[float, ...]  # the lambda of its runs (one value: lambda is part of the experiment)
    stats: dict[str, Stat]   # by metric name (asbatch.analysis.metrics)
    sample_accuracies: tuple[float, ...] = field(default=())  # every run's per-sample accuracies, pooled (%)
    config: dict[str, Any] = field(default_factory=dict)   # the experiment config its runs share
    differs: dict[str, Any] = field(default_factory=dict)  # keys on which it differs from its family -> its values
    seeds: tuple[int, ...] = ()
    runs: tuple[Record, ...] = field(default=(), compare=False, repr=False)

    def __getitem__(self, metric: str) -> Stat:
        return self.stats[metric]

    def get(self, name: str, default: Any = None) -> Any:
        return self.key.get(name, default)

    @property
    def family(self) -> tuple:
        """The rows it is compared with share this: its key without AS on/off and lambda."""
        return tuple((k, v) for k, v in self.key.items() if k not in COMPARED)


def stat(values: Sequence[float | None]) -> Stat:
    """`Stat` of the finite values (None, NaN and inf, e.g. from a hand-edited file, count as missing)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


def per_seed(runs: Iterable[Record], value: Callable[[Record], float | None]) -> list[float | None]:
    """One value per seed (in order of first appearance): the mean of its runs' non-None values, or None."""
    by_seed: dict[int, list[float]] = {}
    for r in runs:
        v = value(r)
        by_seed.setdefault(r.seed, [])
        if v is not None and math.isfinite(v):
            by_seed[r.seed].append(float(v))
    return [statistics.fmean(vs) if vs else None for vs in by_seed.values()]


def _identity_config(r: Record) -> dict[str, Any]:
    """What a record built without a config says about its experiment."""
    return {"data.name": r.data, "model.name": r.model, "model.bayesian": r.bayesian, "adversarial.lam": r.lam,
            "model.init_from": "fine-tune" if r.fine_tuned else None}


def experiments(records: Sequence[Record]) -> list[dict[str, Any]]:
    """The experiment config of each record, in order (`asbatch.analysis.configs.experiment_config`;
    fine-tunes resolved through their upstream runs among `records`)."""
    configs = {r.run_id: r.config for r in records if r.config}
    return [experiment_config(r.config, configs.get) if r.config else _identity_config(r) for r in records]


def _group(by: Sequence[str], key: tuple, config: dict[str, Any], rs: list[Record]) -> Group:
    return Group(key=dict(zip(by, key, strict=True)), n=len({r.seed for r in rs}), run_ids=tuple(r.run_id for r in rs),
                 lams=tuple(sorted({r.lam for r in rs})),
                 stats={m.name: stat(per_seed(rs, lambda r, m=m: r.metrics[m.name])) for m in METRICS},
                 sample_accuracies=tuple(a for r in rs for a in r.sample_accuracies), config=config,
                 seeds=tuple(sorted({r.seed for r in rs})), runs=tuple(rs))


def _name_differences(groups: list[Group]) -> list[Group]:
    families: dict[tuple, list[Group]] = {}
    for g in groups:
        families.setdefault(g.family, []).append(g)
    differs = {fam: differing_keys((g.config for g in members), shown=SHOWN_KEYS) for fam, members in families.items()}
    return [dataclasses.replace(g, differs={k: g.config.get(k, MISSING) for k in differs[g.family]}) for g in groups]


def aggregate(records: Iterable[Record], by: Sequence[str] = DEFAULT_BY, bayesian_only: bool = True) -> list[Group]:
    """Group records by the values of the `by` fields and by experiment config, and compute each metric's mean,
    std (ddof=1) and n over seeds.

    Deterministic runs (e.g. the pretrain stage of a fine-tune sweep) are left out unless `bayesian_only` is
    False: the paper's tables compare Bayesian networks. Groups are ordered by `by` (data sets and models in
    the paper's order, False before True), then by the values of their differing keys."""
    records = list(records)
    buckets: dict[tuple, tuple[dict[str, Any], list[Record]]] = {}
    for r, config in zip(records, experiments(records), strict=True):
        if bayesian_only and not r.bayesian:
            continue
        bucket = (tuple(getattr(r, f) for f in by), tuple(sorted((k, repr(v)) for k, v in config.items())))
        buckets.setdefault(bucket, (config, []))[1].append(r)
    groups = _name_differences([_group(by, key, config, rs) for (key, _), (config, rs) in buckets.items()])
    return sorted(groups, key=lambda g: (tuple(sort_key(f, g.key[f]) for f in by),
                                         tuple(sort_key(k, v) for k, v in g.differs.items()), g.lams))


def default_grouping(records: Iterable[Record]) -> tuple[str, ...]:
    """`DEFAULT_BY`, plus "lam" when some (data, model, fine-tune) has Bayesian AS runs with different lambdas
    (a lambda sweep): one row per lambda, each with its lambda as a column of the CSV; plus "variant" when the
    runs use more than one AS variant: averaging over either would mix different methods."""
    records = list(records)
    lams: dict[tuple, set[float]] = {}
    for r in records:
        if r.bayesian and r.as_on:
            lams.setdefault((r.data, r.model, r.fine_tuned), set()).add(r.lam)
    by = (*DEFAULT_BY, "lam") if any(len(v) > 1 for v in lams.values()) else DEFAULT_BY
    return (*by, "variant") if len({r.variant for r in records if r.bayesian}) > 1 else by

"""One line per comparison that reads a sweep's table: what AS changed against lambda = 0, over seeds.

For each (data set, model, fine-tune, AS variant) with runs at lambda = 0 and at some lambda > 0: the
difference of the means over seeds of the lowest sample accuracy, of the spread (highest - lowest sample
accuracy) and of the ensembled accuracy, each with the standard error of that difference
(sqrt(s1^2 / n1 + s2^2 / n2)), in percentage points. With one run on a side there is no standard error to
give, and the line says so instead of printing a "± 0.0" that would read as certainty.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from asbatch.analysis.records import Record
from asbatch.names import dataset_title, model_title

QUANTITIES = (("lowest", "lowest"), ("spread", "spread"), ("ensemble", "ensembled"))


def _value(record: Record, name: str) -> float:
    return record.highest - record.lowest if name == "spread" else getattr(record, name)


def _difference(treated: Sequence[Record], control: Sequence[Record], name: str) -> tuple[float, float | None]:
    a, b = [_value(r, name) for r in treated], [_value(r, name) for r in control]
    if min(len(a), len(b)) < 2:
        return statistics.fmean(a) - statistics.fmean(b), None
    var = sum(statistics.variance(v) / len(v) for v in (a, b))
    return statistics.fmean(a) - statistics.fmean(b), math.sqrt(var)


def as_effect_lines(records: Iterable[Record]) -> list[str]:
    """'AS (lambda 0.8) vs lambda 0, Digits 0-7 / ResNet20, 3 seeds each: lowest +4.1 ± 1.2, ...' lines."""
    groups: dict[tuple, dict[float, list[Record]]] = {}
    for r in records:
        if r.bayesian:
            groups.setdefault((r.data, r.model, r.fine_tuned, r.variant), {}).setdefault(r.lam, []).append(r)
    variants = {key[3] for key in groups}
    lines = []
    for (data, model, fine_tuned, variant), by_lam in sorted(groups.items()):
        control = by_lam.get(0.0)
        for lam in sorted(k for k in by_lam if k > 0):
            if not control:
                continue
            treated = by_lam[lam]
            parts = []
            for name, label in QUANTITIES:
                diff, err = _difference(treated, control, name)
                parts.append(f"{label} {diff:+.1f}" + (f" ± {err:.1f}" if err is not None else ""))
            n, m = len(treated), len(control)
            how = ("difference of means ± its standard error" if min(n, m) > 1 else
                   "difference of means; one run on a side: no standard error, run more seeds")
            seeds = f"{n} seed{'s' * (n != 1)}" if n == m else f"{n} vs {m} runs"
            where = f"{dataset_title(data)} / {model_title(model)}" + (", fine-tuned" if fine_tuned else "")
            where += f", {variant} variant" if len(variants) > 1 else ""
            lines.append(f"AS (lambda {lam:g}) vs lambda 0, {where}, {seeds}: " + ", ".join(parts)
                         + f" points ({how})")
    return lines

"""Group figures from what each run recorded beyond its metrics: training curves per epoch, reliability diagrams.

`training_curves_figure(records)`: training loss and test accuracy (mean weights) per epoch from each run's
per-epoch rows (`Record.history`: load records with `history=True`), mean over the seeds of a group with a
band of ± 1 std. `reliability_figure(records)`: the reliability diagram of each group, the bins of its seeds
pooled (run dirs only: W&B keeps the per-run diagram as an image). Panels per (data, model, fine-tune); the
groups are those of the tables (`aggregate`: Bayesian runs, one experiment each).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from asbatch.analysis.aggregate import Group, aggregate, default_grouping, per_seed, stat
from asbatch.analysis.panels import grid, group_colors, group_label, hide_unused, in_panel, panel_title, panels
from asbatch.analysis.records import Record
from asbatch.figures import new_figure
from asbatch.runshape import epoch_test_acc

NO_HISTORY = "no per-epoch metrics among the runs read (records need history=True)"
NO_RELIABILITY = "no reliability data among the runs read (W&B keeps it only as an image: read the run dirs)"
TRAIN_BAND = "mean, band ± 1 std over n seeds"


def _test_accuracy(row: dict[str, Any]) -> float | None:
    value = epoch_test_acc(row)
    return None if value is None else 100 * value


CURVES = (("train_loss", "training loss", lambda row: row.get("train_loss")),
          ("test_acc", "test accuracy (%), mean weights", _test_accuracy))


def epoch_curve(runs: Sequence[Record], value) -> tuple[list[int], list[float], list[float], list[int]]:
    """(epochs 1.., mean, std, n seeds) of `value(row)` over the runs' per-epoch rows, each epoch's mean and
    std over the seeds that have it."""
    rows = {id(r): {int(row["epoch"]): row for row in r.history or () if "epoch" in row} for r in runs}
    epochs = sorted({e for by_epoch in rows.values() for e in by_epoch})
    xs, means, stds, ns = [], [], [], []
    for e in epochs:
        s = stat(per_seed(runs, lambda r, e=e: value(rows[id(r)][e]) if e in rows[id(r)] else None))
        if s.mean is not None:
            xs.append(e + 1)
            means.append(s.mean)
            stds.append(s.std)
            ns.append(s.n)
    return xs, means, stds, ns


def training_curves_figure(records: Iterable[Record]):
    """Training loss and test accuracy per epoch, a curve per group (mean, band ± 1 std over seeds); a row
    of two panels per (data, model, fine-tune)."""
    groups = [g for g in aggregate(records, by=default_grouping(records)) if any(r.history for r in g.runs)]
    if not groups:
        return NO_HISTORY
    from matplotlib.ticker import MaxNLocator

    shown = panels(groups)
    fig, axes = new_figure(len(shown), 2)
    for row, panel in enumerate(shown):
        members = in_panel(groups, panel)
        for col, (_key, label, value) in enumerate(CURVES):
            ax = axes[row][col]
            for g, color in zip(members, group_colors(members), strict=True):
                xs, mean, std, ns = epoch_curve(g.runs, value)
                ax.plot(xs, mean, "-", marker="o" if len(xs) < 30 else None, color=color,
                        label=group_label(g, max(ns, default=0)))
                ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                                [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=0.2)
            ax.set(xlabel="epoch", ylabel=label, title=f"{panel_title(*panel)}: {label}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title=TRAIN_BAND, title_fontsize=8)
    return fig


def pooled_reliability(runs: Iterable[Record]) -> dict[str, list] | None:
    """The reliability bins of all `runs` together: counts summed, accuracy and mean confidence weighted by
    the counts (None when no run has bins; runs with another number of bins than the first are left out)."""
    bins = [r.reliability for r in runs if r.reliability and r.reliability.get("count")]
    if not bins:
        return None
    n_bins = len(bins[0]["count"])
    bins = [b for b in bins if len(b["count"]) == n_bins]
    count = [sum(b["count"][i] for b in bins) for i in range(n_bins)]

    def weighted(name: str) -> list[Any]:
        return [sum(b["count"][i] * b[name][i] for b in bins if b["count"][i]) / count[i] if count[i] else None
                for i in range(n_bins)]

    return {"count": count, "confidence": weighted("confidence"), "accuracy": weighted("accuracy")}


def reliability_figure(records: Iterable[Record]):
    """Accuracy against confidence per bin, a curve per group (its seeds' bins pooled; ECE mean ± 1 std over
    seeds in the legend), the diagonal of perfect calibration; a panel per (data, model, fine-tune)."""
    groups = [g for g in aggregate(records, by=default_grouping(records)) if pooled_reliability(g.runs)]
    if not groups:
        return NO_RELIABILITY
    shown = panels(groups)
    nrows, ncols = grid(len(shown))
    fig, axes = new_figure(nrows, ncols, width=4.8, height=5.6)
    for i, panel in enumerate(shown):
        ax = axes[i // ncols][i % ncols]
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        members = in_panel(groups, panel)
        for g, color in zip(members, group_colors(members), strict=True):
            _plot_reliability(ax, g, color)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean of the bin)", ylabel="accuracy of the bin",
               title=panel_title(*panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), title_fontsize=7,
                  title="bins of the n seeds pooled; ECE: mean ± 1 std over n seeds")
    hide_unused(axes, len(shown), nrows, ncols)
    return fig


def _plot_reliability(ax, group: Group, color) -> None:
    rel = pooled_reliability(group.runs)
    filled = [b for b, c in enumerate(rel["count"]) if c]
    ece = group["ece"]
    ax.plot([rel["confidence"][b] for b in filled], [rel["accuracy"][b] for b in filled], "o-", color=color,
            markersize=4, label=f"{group_label(group)}, ECE {ece.mean:.4f} ± {ece.std:.4f}")

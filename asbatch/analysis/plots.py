"""The sweep figures (PNG): influence of lambda, accuracy against retained data, single weight samples, and the
figures of `asbatch.analysis.curves` (training curves, reliability diagrams); `write_plots` writes them all.

Each figure is `<name>_figure(records) -> Figure` (or a message saying why there is none), saved by
`plot_<name>(records, path) -> path`. Groups are the experiments of `aggregate` (never runs of different
configs pooled); error bars and bands are ± 1 std over the seeds and say so; colours come from the one colour
function (`asbatch.figures.method_color`). The metrics and labels come from the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from asbatch.analysis.aggregate import Group, aggregate, default_grouping
from asbatch.analysis.curves import reliability_figure, training_curves_figure
from asbatch.analysis.metrics import BY_NAME, SAMPLE_ACCURACIES, table_metrics
from asbatch.analysis.panels import (
    NO_RUNS,
    count,
    differs_text,
    grid,
    group_colors,
    group_label,
    hide_unused,
    in_panel,
    method_label,
    panel_title,
    panels,
    uses_as,
)
from asbatch.analysis.records import Record
from asbatch.figures import NEUTRAL_COLOR, message_png, method_color, new_figure, save_png
from asbatch.names import model_title

MARKERS = "osD^v<>ph*"
ERROR_BARS = "error bars: ± 1 std over n seeds"
BAND = "band: ± 1 std over n seeds"


def seeds_text(ns: Iterable[int]) -> str:
    """"3 seeds", or "2–3 seeds" where the points of a line have different numbers of seeds."""
    ns = sorted(set(ns))
    return count(ns[0], "seed") if len(ns) == 1 else f"{ns[0]}–{ns[-1]} seeds"


def _line_handle(marker: str, line: bool, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=NEUTRAL_COLOR, marker=marker, linestyle="-" if line else "none", label=label)


def _method_handles(groups: Sequence[Group]) -> list:
    from matplotlib.lines import Line2D

    present = sorted({uses_as(g) for g in groups})
    names = {False: "no AS (λ = 0)", True: "AS (λ > 0)"}
    return [Line2D([], [], color=method_color(as_on), marker="s", linestyle="none", label=names[as_on])
            for as_on in present]


def lambda_influence_figure(records: Iterable[Record]):
    """Ensembled and lowest accuracy (mean, error bars ± 1 std over seeds) against lambda: a marker per model
    (and config), coloured by method (λ = 0: no AS); the points of a model are joined by a line only where it
    has three lambdas or more (two points are two points, not a trend). A row of panels per data set (and
    fine-tune setting)."""
    groups = aggregate(records, by=("data", "fine_tuned", "model", "lam"))
    if not groups:
        return NO_RUNS
    rows = list(dict.fromkeys((g.get("data"), g.get("fine_tuned")) for g in groups))
    fig, axes = new_figure(len(rows), 2)
    for row, (data, ft) in enumerate(rows):
        in_row = [g for g in groups if (g.get("data"), g.get("fine_tuned")) == (data, ft)]
        lines = list(dict.fromkeys((g.get("model"), differs_text(g)) for g in in_row))
        for col, metric in enumerate((BY_NAME["ensemble"], BY_NAME["lowest"])):
            ax, handles = axes[row][col], []
            for i, (model, differs) in enumerate(lines):
                points = sorted((g for g in in_row if (g.get("model"), differs_text(g)) == (model, differs)),
                                key=lambda g: g.get("lam"))
                marker, joined = MARKERS[i % len(MARKERS)], len(points) >= 3
                if joined:
                    ax.plot([g.get("lam") for g in points], [g[metric.name].mean for g in points], "-",
                            color=NEUTRAL_COLOR, alpha=0.6, zorder=1)
                for g in points:
                    ax.errorbar([g.get("lam")], [g[metric.name].mean], yerr=[g[metric.name].std], fmt=marker,
                                linestyle="none", color=method_color(uses_as(g)), capsize=4, zorder=2)
                handles.append(_line_handle(marker, joined, f"{model_title(model)}{differs}, "
                                                            f"n = {seeds_text(g.n for g in points)}"))
            ax.set_xticks(sorted({g.get("lam") for g in in_row}))
            ax.set(xlabel="λ", ylabel=f"{metric.short} accuracy (%)",
                   title=f"{panel_title(data, None, ft)}: {metric.short} accuracy")
            ax.grid(alpha=0.3)
            ax.legend(handles=handles + _method_handles(in_row), title=ERROR_BARS, fontsize=8, title_fontsize=8)
    return fig


def retained_curves_figure(records: Iterable[Record]):
    """Ensembled accuracy on the most certain 20..100 % of the test data (100 % = all), a curve per group
    (mean, band ± 1 std over seeds), a panel per (data, model, fine-tune)."""
    groups = aggregate(records, by=default_grouping(records))
    if not groups:
        return NO_RUNS
    # the retained-data columns of the paper, and the ensembled accuracy on all the data as the 100 % point
    metrics = [*table_metrics("retained"), BY_NAME["ensemble"]]
    xs = [100 * float(m.key[-1]) for m in metrics[:-1]] + [100.0]
    shown = panels(groups)
    nrows, ncols = grid(len(shown))
    fig, axes = new_figure(nrows, ncols)
    for i, panel in enumerate(shown):
        ax = axes[i // ncols][i % ncols]
        members = in_panel(groups, panel)
        for g, color in zip(members, group_colors(members), strict=True):
            stats = [g[m.name] for m in metrics]
            mean = [s.mean for s in stats]
            ax.plot(xs, mean, "o-", color=color, label=group_label(g))
            ax.fill_between(xs, [m - s.std for m, s in zip(mean, stats, strict=True)],
                            [m + s.std for m, s in zip(mean, stats, strict=True)], color=color, alpha=0.2)
        ax.set(xlabel="data retained (%), most certain first", ylabel="accuracy (%)", title=panel_title(*panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title=BAND, title_fontsize=8)
    hide_unused(axes, len(shown), nrows, ncols)
    return fig


def sample_accuracy_distribution_figure(records: Iterable[Record]):
    """Accuracy of every single weight sample (all seeds of a group pooled), per group: violins (where the
    values are not all equal) and the points, a panel per (data, model, fine-tune)."""
    import numpy as np

    groups = [g for g in aggregate(records, by=default_grouping(records)) if g.sample_accuracies]
    if not groups:
        return NO_RUNS
    shown = panels(groups)
    nrows, ncols = grid(len(shown))
    fig, axes = new_figure(nrows, ncols)
    jitter = np.random.default_rng(0)
    for i, panel in enumerate(shown):
        ax = axes[i // ncols][i % ncols]
        members = in_panel(groups, panel)
        for pos, (g, color) in enumerate(zip(members, group_colors(members), strict=True), start=1):
            values = np.asarray(g.sample_accuracies, dtype=float)
            if np.unique(values).size > 1:
                parts = ax.violinplot([values], positions=[pos], showmeans=True, widths=0.7)
                for body in parts["bodies"]:
                    body.set_facecolor(color)
                    body.set_alpha(0.3)
                for key in ("cbars", "cmins", "cmaxes", "cmeans"):
                    parts[key].set_color(color)
            ax.scatter(pos + jitter.uniform(-0.12, 0.12, values.size), values, s=10, color=color, alpha=0.8)
        ax.set_xticks(range(1, len(members) + 1),
                      [f"{method_label(g)}\n{count(len(g.sample_accuracies), 'sample')}, {count(g.n, 'seed')}"
                       for g in members], fontsize=8)
        ax.set(ylabel=SAMPLE_ACCURACIES.header, title=panel_title(*panel))
        ax.grid(alpha=0.3, axis="y")
    hide_unused(axes, len(shown), nrows, ncols)
    return fig


Figure = Callable[[Iterable[Record]], object]


def _saver(make: Figure) -> Callable[[Iterable[Record], str | Path], Path]:
    def plot(records: Iterable[Record], path: str | Path) -> Path:
        fig = make(list(records))
        return message_png(path, fig) if isinstance(fig, str) else save_png(fig, path)

    plot.__doc__ = f"Save `{make.__name__}(records)` as a PNG at `path` (a message PNG where there is nothing to show)."
    return plot


plot_lambda_influence = _saver(lambda_influence_figure)
plot_retained_curves = _saver(retained_curves_figure)
plot_sample_accuracy_distribution = _saver(sample_accuracy_distribution_figure)
plot_training_curves = _saver(training_curves_figure)
plot_reliability = _saver(reliability_figure)

# name -> (section title in the report, saver); the report shows them in this order
ANALYSIS_PLOTS: dict[str, tuple[str, Callable[[Iterable[Record], str | Path], Path]]] = {
    "training_curves": ("Training: loss and test accuracy per epoch", plot_training_curves),
    "lambda_influence": ("Influence of λ", plot_lambda_influence),
    "retained_curves": ("Accuracy vs retained data", plot_retained_curves),
    "reliability": ("Reliability diagrams", plot_reliability),
    "sample_accuracy_distribution": ("Accuracy of single weight samples", plot_sample_accuracy_distribution),
}


def write_plots(records: Sequence[Record], out_dir: str | Path) -> dict[str, Path]:
    """Every sweep figure as `<out_dir>/<name>.png`; returns {name: path}."""
    return {name: make(records, Path(out_dir) / f"{name}.png") for name, (_, make) in ANALYSIS_PLOTS.items()}

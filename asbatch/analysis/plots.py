"""The sweep figures (PNG): influence of lambda, accuracy against retained data, accuracy of single weight samples.

Each is `(records, path) -> path`; `write_plots(records, out_dir)` writes them all. The metrics they show and
their labels come from the registry (asbatch.analysis.metrics); figure helpers from asbatch.figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from asbatch.analysis.aggregate import Group, aggregate, default_grouping
from asbatch.analysis.metrics import BY_NAME, SAMPLE_ACCURACIES, table_metrics
from asbatch.analysis.records import Record
from asbatch.figures import AS_COLOR, PLAIN_COLOR, message_png, new_figure, save_png
from asbatch.names import dataset_title, model_title

NO_RUNS = "no finished Bayesian runs"


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max(n, 1), max_cols)
    return -(-max(n, 1) // cols), cols


def _panel_title(data: str, model: str | None, fine_tuned: Any) -> str:
    parts = [dataset_title(data)] + ([model_title(model)] if model is not None else [])
    return " ".join(parts) + (", Bayesian fine-tune" if fine_tuned else "")


def _as_label(group: Group) -> str:
    variant = f" [{group.get('variant')}]" if "variant" in group.key else ""  # a sweep with several AS variants
    if not group.get("as_on"):
        return "no AS" + variant
    lams = ", ".join(f"{v:g}" for v in group.lams)
    return (f"AS (λ = {lams})" if len(group.lams) == 1 else f"AS (λ in {{{lams}}})") + variant


def _colors(groups: Sequence[Group]) -> list[str | tuple]:
    """Blue without AS; red with AS, in shades from light to dark when a panel has several lambdas."""
    from matplotlib import colormaps

    n_as = sum(bool(g.get("as_on")) for g in groups)
    shades = iter([colormaps["Reds"](0.45 + 0.5 * i / max(n_as - 1, 1)) for i in range(n_as)])
    return [(AS_COLOR if n_as == 1 else next(shades)) if g.get("as_on") else PLAIN_COLOR for g in groups]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _panels(groups: Sequence[Group]) -> list[tuple[Any, Any, Any]]:
    return list(dict.fromkeys((g.get("data"), g.get("model"), g.get("fine_tuned")) for g in groups))


def _in_panel(groups: Sequence[Group], panel: tuple[Any, Any, Any]) -> list[Group]:
    """The groups of a (data, model, fine-tune) panel: no AS first, then AS by lambda."""
    return sorted((g for g in groups if (g.get("data"), g.get("model"), g.get("fine_tuned")) == panel),
                  key=lambda g: (bool(g.get("as_on")), g.lams))


def plot_lambda_influence(records: Iterable[Record], path: str | Path) -> Path:
    """Ensembled and lowest accuracy (mean ± std over seeds) against lambda, a line per model; a row of
    panels per data set (and fine-tune setting)."""
    records = list(records)
    variants = ("variant",) if "variant" in default_grouping(records) else ()
    groups = aggregate(records, by=("data", "fine_tuned", "model", *variants, "lam"))
    if not groups:
        return message_png(path, NO_RUNS)
    panels = list(dict.fromkeys((g.get("data"), g.get("fine_tuned")) for g in groups))
    fig, axes = new_figure(len(panels), 2)
    for row, (data, ft) in enumerate(panels):
        for col, metric in enumerate((BY_NAME["ensemble"], BY_NAME["lowest"])):
            ax = axes[row][col]
            in_panel = [g for g in groups if (g.get("data"), g.get("fine_tuned")) == (data, ft)]
            for model, variant in dict.fromkeys((g.get("model"), g.get("variant")) for g in in_panel):
                line = sorted((g for g in in_panel if (g.get("model"), g.get("variant")) == (model, variant)),
                              key=lambda g: g.get("lam"))
                ax.errorbar([g.get("lam") for g in line], [g[metric.name].mean for g in line],
                            yerr=[g[metric.name].std for g in line], marker="o", capsize=3,
                            label=model_title(model) + (f" ({variant})" if variant else ""))
            ax.set(xlabel="λ", ylabel=f"{metric.short} accuracy (%)",
                   title=f"{_panel_title(data, None, ft)}: {metric.short} accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_retained_curves(records: Iterable[Record], path: str | Path) -> Path:
    """Ensembled accuracy on the most certain 20..100 % of the test data (100 % = all), with and without AS
    (mean ± std band over seeds), a panel per (data, model, fine-tune)."""
    groups = aggregate(records, by=default_grouping(records))
    if not groups:
        return message_png(path, NO_RUNS)
    # the retained-data columns of the paper, and the ensembled accuracy on all the data as the 100 % point
    metrics = [*table_metrics("retained"), BY_NAME["ensemble"]]
    xs = [100 * float(m.key[-1]) for m in metrics[:-1]] + [100.0]
    panels = _panels(groups)
    nrows, ncols = _grid(len(panels))
    fig, axes = new_figure(nrows, ncols)
    for i, panel in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        in_panel = _in_panel(groups, panel)
        for g, color in zip(in_panel, _colors(in_panel), strict=True):
            stats = [g[m.name] for m in metrics]
            mean = [s.mean for s in stats]
            ax.plot(xs, mean, "o-", color=color, label=f"{_as_label(g)}, n={g.n}")
            ax.fill_between(xs, [m - s.std for m, s in zip(mean, stats, strict=True)],
                            [m + s.std for m, s in zip(mean, stats, strict=True)], color=color, alpha=0.2)
        ax.set(xlabel="data retained (%), most certain first", ylabel="accuracy (%)", title=_panel_title(*panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return save_png(fig, path)


def plot_sample_accuracy_distribution(records: Iterable[Record], path: str | Path) -> Path:
    """Accuracy of every single weight sample (all seeds pooled), without and with AS: violins (where the
    values are not all equal) and the points, a panel per (data, model, fine-tune)."""
    import numpy as np

    groups = [g for g in aggregate(records, by=default_grouping(records)) if g.sample_accuracies]
    if not groups:
        return message_png(path, NO_RUNS)
    panels = _panels(groups)
    nrows, ncols = _grid(len(panels))
    fig, axes = new_figure(nrows, ncols)
    jitter = np.random.default_rng(0)
    for i, panel in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        in_panel = _in_panel(groups, panel)
        for pos, (g, color) in enumerate(zip(in_panel, _colors(in_panel), strict=True), start=1):
            values = np.asarray(g.sample_accuracies, dtype=float)
            if np.unique(values).size > 1:
                parts = ax.violinplot([values], positions=[pos], showmeans=True, widths=0.7)
                for body in parts["bodies"]:
                    body.set_facecolor(color)
                    body.set_alpha(0.3)
                for key in ("cbars", "cmins", "cmaxes", "cmeans"):
                    parts[key].set_color(color)
            ax.scatter(pos + jitter.uniform(-0.12, 0.12, values.size), values, s=10, color=color, alpha=0.8)
        ax.set_xticks(range(1, len(in_panel) + 1),
                      [_as_label(g).replace(" [", "\n[")  # the variant on a line of its own
                       + f"\n{_count(len(g.sample_accuracies), 'sample')},\n{_count(g.n, 'run')}" for g in in_panel],
                      fontsize=8)
        ax.set(ylabel=SAMPLE_ACCURACIES.header, title=_panel_title(*panel))
        ax.grid(alpha=0.3, axis="y")
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return save_png(fig, path)


ANALYSIS_PLOTS: dict[str, tuple[str, Callable[[Iterable[Record], str | Path], Path]]] = {
    "lambda_influence": ("Influence of λ", plot_lambda_influence),
    "retained_curves": ("Accuracy vs retained data", plot_retained_curves),
    "sample_accuracy_distribution": ("Accuracy of single weight samples", plot_sample_accuracy_distribution),
}


def write_plots(records: Sequence[Record], out_dir: str | Path) -> dict[str, Path]:
    """Every sweep figure as `<out_dir>/<name>.png`; returns {name: path}."""
    return {name: make(records, Path(out_dir) / f"{name}.png") for name, (_, make) in ANALYSIS_PLOTS.items()}

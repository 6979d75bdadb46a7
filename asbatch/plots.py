"""Figures (PNG, matplotlib without pyplot: no global backend, safe in any process) and the static report.

Per run (used by asbatch.tracking): `retained_curve(evaluation, path)`, `reliability_diagram(evaluation, path)`.
Per sweep (records from asbatch.results): `plot_lambda_influence`, `plot_retained_curves`,
`plot_sample_accuracy_distribution` (each `(records, path) -> path`), `write_plots(records, out_dir)`, and
`build_static_report(sweep_dir)`, which writes `<sweep_dir>/report/report.{md,html}` with tables and figures.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from asbatch.results import (RETAINED, RETAINED_METRICS, Group, Record, aggregate, data_display_name,
                             default_grouping, describe, model_display_name, records_from_run_dirs,
                             sweep_tables)

AS_COLOR, PLAIN_COLOR = "tab:red", "tab:blue"
DPI = 110
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure(nrows: int = 1, ncols: int = 1, width: float = 4.4, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _message(path: str | Path, text: str) -> Path:
    """A small PNG that says why there is no plot (so a report never has a missing image)."""
    fig, axes = _figure(1, 1, 5, 1.6)
    ax = axes[0][0]
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11)
    return _save(fig, path)


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max(n, 1), max_cols)
    return -(-max(n, 1) // cols), cols


def _panel_title(data: str, model: str | None, fine_tuned: Any) -> str:
    parts = [data_display_name(data)] + ([model_display_name(model)] if model is not None else [])
    return " ".join(parts) + (", Bayesian fine-tune" if fine_tuned else "")


def _as_label(group: Group) -> str:
    if not group.get("as_on"):
        return "no AS"
    lams = ", ".join(f"{v:g}" for v in group.lams)
    return f"AS (λ = {lams})" if len(group.lams) == 1 else f"AS (λ in {{{lams}}})"


def _colors(groups: Sequence[Group]) -> list[str | tuple]:
    """Blue without AS; red with AS, in shades from light to dark when a panel has several lambdas."""
    from matplotlib import colormaps

    n_as = sum(bool(g.get("as_on")) for g in groups)
    shades = iter([colormaps["Reds"](0.45 + 0.5 * i / max(n_as - 1, 1)) for i in range(n_as)])
    return [(AS_COLOR if n_as == 1 else next(shades)) if g.get("as_on") else PLAIN_COLOR for g in groups]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------------------------ per run


def retained_curve(evaluation: Mapping[str, Any], path: str | Path) -> Path:
    """One run: ensembled accuracy (%) on the most certain X % of the test data, against X."""
    retained = evaluation.get("retained_accuracy") or {}
    if not retained:
        return _message(path, "no retained-accuracy data")
    xs = sorted(retained, key=float)
    fig, axes = _figure()
    ax = axes[0][0]
    ax.plot([100 * float(x) for x in xs], [100 * retained[x] for x in xs], "o-", color=AS_COLOR)
    ax.set(xlabel="data retained (%), most certain first", ylabel="accuracy (%)",
           title=f"Accuracy vs retained data (score: {evaluation.get('score', '?')})")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability_diagram(evaluation: Mapping[str, Any], path: str | Path) -> Path:
    """One run: accuracy per confidence bin against the diagonal (the ensemble prediction), ECE in the title."""
    rel = evaluation.get("reliability")
    if not rel or not rel.get("count"):
        return _message(path, "no reliability data")
    n_bins = len(rel["count"])
    width = 1.0 / n_bins
    fig, axes = _figure()
    ax = axes[0][0]
    centers = [(b + 0.5) * width for b in range(n_bins)]
    filled = [b for b in range(n_bins) if rel["count"][b] and rel["accuracy"][b] is not None]
    ax.bar([centers[b] for b in filled], [rel["accuracy"][b] for b in filled], width=width * 0.9,
           color=PLAIN_COLOR, alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot([rel["confidence"][b] for b in filled], [rel["accuracy"][b] for b in filled], "o", color="black",
            markersize=3, label="(mean confidence, accuracy)")
    ece = evaluation.get("ece")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title="Reliability diagram" + (f" (ECE {ece:.4f})" if ece is not None else ""))
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- per sweep


def plot_lambda_influence(records: Iterable[Record], path: str | Path) -> Path:
    """Ensembled and lowest accuracy (mean ± std over seeds) against lambda, a line per model; a row of
    panels per data set (and fine-tune setting)."""
    groups = aggregate(records, by=("data", "fine_tuned", "model", "lam"))
    if not groups:
        return _message(path, "no finished Bayesian runs")
    panels = list(dict.fromkeys((g.get("data"), g.get("fine_tuned")) for g in groups))
    fig, axes = _figure(len(panels), 2)
    for row, (data, ft) in enumerate(panels):
        for col, (metric, name) in enumerate((("ensemble", "ensembled"), ("lowest", "lowest"))):
            ax = axes[row][col]
            in_panel = [g for g in groups if (g.get("data"), g.get("fine_tuned")) == (data, ft)]
            for model in dict.fromkeys(g.get("model") for g in in_panel):
                line = sorted((g for g in in_panel if g.get("model") == model), key=lambda g: g.get("lam"))
                ax.errorbar([g.get("lam") for g in line], [g[metric].mean for g in line],
                            yerr=[g[metric].std for g in line], marker="o", capsize=3,
                            label=model_display_name(model))
            ax.set(xlabel="λ", ylabel=f"{name} accuracy (%)",
                   title=f"{_panel_title(data, None, ft)}: {name} accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_retained_curves(records: Iterable[Record], path: str | Path) -> Path:
    """Ensembled accuracy on the most certain 20..100 % of the test data (100 % = all), with and without AS
    (mean ± std band over seeds), a panel per (data, model, fine-tune)."""
    groups = aggregate(records, by=default_grouping(records))
    if not groups:
        return _message(path, "no finished Bayesian runs")
    panels = list(dict.fromkeys((g.get("data"), g.get("model"), g.get("fine_tuned")) for g in groups))
    nrows, ncols = _grid(len(panels))
    fig, axes = _figure(nrows, ncols)
    xs = [100 * float(f) for f in RETAINED] + [100.0]
    for i, panel in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        in_panel = sorted((g for g in groups if (g.get("data"), g.get("model"), g.get("fine_tuned")) == panel),
                          key=lambda g: (bool(g.get("as_on")), g.lams))
        for g, color in zip(in_panel, _colors(in_panel)):
            stats = [g[m] for m in RETAINED_METRICS] + [g["ensemble"]]
            mean = [s.mean for s in stats]
            ax.plot(xs, mean, "o-", color=color, label=f"{_as_label(g)}, n={g.n}")
            ax.fill_between(xs, [m - s.std for m, s in zip(mean, stats)], [m + s.std for m, s in zip(mean, stats)],
                            color=color, alpha=0.2)
        ax.set(xlabel="data retained (%), most certain first", ylabel="accuracy (%)", title=_panel_title(*panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return _save(fig, path)


def plot_sample_accuracy_distribution(records: Iterable[Record], path: str | Path) -> Path:
    """Accuracy of every single weight sample (all seeds pooled), without and with AS: violins (where the
    values are not all equal) and the points, a panel per (data, model, fine-tune)."""
    import numpy as np

    groups = [g for g in aggregate(records, by=default_grouping(records)) if g.sample_accuracies]
    if not groups:
        return _message(path, "no finished Bayesian runs")
    panels = list(dict.fromkeys((g.get("data"), g.get("model"), g.get("fine_tuned")) for g in groups))
    nrows, ncols = _grid(len(panels))
    fig, axes = _figure(nrows, ncols)
    jitter = np.random.default_rng(0)
    for i, panel in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        in_panel = sorted((g for g in groups if (g.get("data"), g.get("model"), g.get("fine_tuned")) == panel),
                          key=lambda g: (bool(g.get("as_on")), g.lams))
        for pos, (g, color) in enumerate(zip(in_panel, _colors(in_panel)), start=1):
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
                      [f"{_as_label(g)}\n{_count(len(g.sample_accuracies), 'sample')}, {_count(g.n, 'run')}"
                       for g in in_panel],
                      fontsize=8)
        ax.set(ylabel="accuracy of one weight sample (%)", title=_panel_title(*panel))
        ax.grid(alpha=0.3, axis="y")
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return _save(fig, path)


ANALYSIS_PLOTS: dict[str, tuple[str, Callable[[Iterable[Record], str | Path], Path]]] = {
    "lambda_influence": ("Influence of λ", plot_lambda_influence),
    "retained_curves": ("Accuracy vs retained data", plot_retained_curves),
    "sample_accuracy_distribution": ("Accuracy of single weight samples", plot_sample_accuracy_distribution),
}


def write_plots(records: Sequence[Record], out_dir: str | Path) -> dict[str, Path]:
    """Every sweep figure as `<out_dir>/<name>.png`; returns {name: path}."""
    return {name: make(records, Path(out_dir) / f"{name}.png") for name, (_, make) in ANALYSIS_PLOTS.items()}


# -------------------------------------------------------------------------------------------------- report

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table.paper{border-collapse:collapse;margin:1.5em 0;font-size:14px}
table.paper caption{text-align:left;margin-bottom:.4em}
table.paper th,table.paper td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
table.paper th:nth-child(-n+2),table.paper td:nth-child(-n+2){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}"""


def build_static_report(sweep_dir: str | Path, out_dir: str | Path | None = None,
                        records: Sequence[Record] | None = None) -> Path:
    """Write report.md and report.html (tables + figures) for the sweep into `out_dir` (default
    `<sweep_dir>/report/`), next to the figures' PNGs; report.html is self-contained (PNGs embedded).
    `records` defaults to `records_from_run_dirs(sweep_dir)`. Returns the path of report.html."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    if records is None:
        records = records_from_run_dirs(sweep_dir)
    pngs = write_plots(records, out_dir)
    title = f"Sweep {sweep_dir.name}"
    summary = describe(records)

    md = [f"# {title}", "", summary + ".", "", "## Tables", "", sweep_tables(records, "md").rstrip(), "",
          "## Figures", ""]
    for name, path in pngs.items():
        md += [f"### {ANALYSIS_PLOTS[name][0]}", "", f"![{name}]({path.name})", ""]
    (out_dir / "report.md").write_text("\n".join(md))

    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}.</p>", "<h2>Tables</h2>",
            sweep_tables(records, "html"), "<h2>Figures</h2>"]
    for name, path in pngs.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body += [f"<h3>{html.escape(ANALYSIS_PLOTS[name][0])}</h3>",
                 f'<img alt="{name}" src="data:image/png;base64,{data}">']
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    report = out_dir / "report.html"
    report.write_text(page)
    return report

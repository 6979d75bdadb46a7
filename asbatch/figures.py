"""Figures as PNG files (matplotlib without pyplot: no global backend, safe in any process): the shared
helpers, and the per-run figures that tracking logs to W&B and the report shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asbatch.fsutil import atomic_write_bytes

AS_COLOR, PLAIN_COLOR, NEUTRAL_COLOR = "tab:red", "tab:blue", "dimgray"
DPI = 110
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def method_color(as_on: bool | None, index: int = 0, count: int = 1) -> str | tuple:
    """THE colour of a method in every figure: red with Adversarial Sampling, blue without, gray when not known.
    `count` > 1 curves of one method in a panel (several lambdas or configs) get shades of it, light to
    dark by `index`."""
    if as_on is None:
        return NEUTRAL_COLOR
    if count <= 1:
        return AS_COLOR if as_on else PLAIN_COLOR
    from matplotlib import colormaps

    return colormaps["Reds" if as_on else "Blues"](0.45 + 0.5 * index / (count - 1))


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 4.4, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_png(fig, path: str | Path) -> Path:
    """Write the figure atomically: a full disk leaves no half PNG, and its error names the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: fig.savefig(f, dpi=DPI, format="png"))
    return path


def message_png(path: str | Path, text: str) -> Path:
    """A small PNG that says why there is no plot (so a report never has a missing image)."""
    fig, axes = new_figure(1, 1, 5, 1.6)
    ax = axes[0][0]
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11)
    return save_png(fig, path)


def retained_curve(evaluation: Mapping[str, Any], path: str | Path, as_on: bool | None = None) -> Path:
    """One run: ensembled accuracy (%) on the most certain X % of the test data, against X (in the colour of
    its method when `as_on` is given)."""
    retained = evaluation.get("retained_accuracy") or {}
    if not retained:
        return message_png(path, "no retained-accuracy data")
    xs = sorted(retained, key=float)
    fig, axes = new_figure()
    ax = axes[0][0]
    ax.plot([100 * float(x) for x in xs], [100 * retained[x] for x in xs], "o-", color=method_color(as_on))
    ax.set(xlabel="data retained (%), most certain first", ylabel="accuracy (%)",
           title=f"Accuracy vs retained data (score: {evaluation.get('score', '?')})")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def reliability_diagram(evaluation: Mapping[str, Any], path: str | Path, as_on: bool | None = None) -> Path:
    """One run: accuracy per confidence bin against the diagonal (the ensemble prediction), ECE in the title
    (bars in the colour of its method when `as_on` is given)."""
    rel = evaluation.get("reliability")
    if not rel or not rel.get("count"):
        return message_png(path, "no reliability data")
    n_bins = len(rel["count"])
    width = 1.0 / n_bins
    fig, axes = new_figure()
    ax = axes[0][0]
    centers = [(b + 0.5) * width for b in range(n_bins)]
    filled = [b for b in range(n_bins) if rel["count"][b] and rel["accuracy"][b] is not None]
    ax.bar([centers[b] for b in filled], [rel["accuracy"][b] for b in filled], width=width * 0.9,
           color=method_color(as_on), alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot([rel["confidence"][b] for b in filled], [rel["accuracy"][b] for b in filled], "o", color="black",
            markersize=3, label="(mean confidence, accuracy)")
    ece = evaluation.get("ece")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title="Reliability diagram" + (f" (ECE {ece:.4f})" if ece is not None else ""))
    ax.legend(loc="best", fontsize=8)
    return save_png(fig, path)

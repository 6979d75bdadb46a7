"""What the report's figures show (asbatch.analysis.plots / curves): training curves and reliability diagrams
per group, error bars that say what they are, the lambda plot honest with two lambdas, one colour per method.
Checked on the matplotlib Figure objects (lines, legends, colours), from records with known values."""

from __future__ import annotations

import pytest
from matplotlib.colors import to_rgba

from asbatch.analysis import (
    Record,
    lambda_influence_figure,
    reliability_figure,
    retained_curves_figure,
    sample_accuracy_distribution_figure,
    training_curves_figure,
)
from asbatch.analysis.curves import NO_HISTORY, NO_RELIABILITY, pooled_reliability
from asbatch.figures import method_color

METRICS = dict(lowest=80.0, highest=85.0, mean_acc=82.0, ensemble=86.0, retained_20=99.0, retained_40=98.0,
               retained_60=97.0, retained_80=96.0, ece=0.05, nll=0.5, brier=0.2, aurc=0.03)
RED, BLUE = to_rgba(method_color(True)), to_rgba(method_color(False))


def rec(run_id: str, lam: float = 0.0, seed: int = 0, model: str = "resnet20", losses=(2.0, 1.0), accs=(0.5, 0.7),
        reliability=None, **metrics) -> Record:
    history = [{"epoch": e, "global_step": 10 * (e + 1), "train_loss": loss, "test_acc_mean": acc}
               for e, (loss, acc) in enumerate(zip(losses, accs, strict=True))]
    return Record(run_id=run_id, sweep="s", stage="train", data="cifar10", model=model, bayesian=True, lam=lam,
                  as_on=lam > 0, fine_tuned=False, seed=seed, history=history, train=history[-1],
                  reliability=reliability, sample_accuracies=(80.0, 81.0), **{**METRICS, **metrics})


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_training_curves_are_the_mean_over_seeds_per_epoch_with_a_labelled_band():
    records = [rec("a0", losses=(2.0, 1.0), accs=(0.5, 0.7)), rec("a1", seed=1, losses=(3.0, 2.0), accs=(0.6, 0.9)),
               rec("b0", lam=0.8, losses=(1.5, 0.5), accs=(0.55, 0.75))]
    fig = training_curves_figure(records)
    loss_ax, acc_ax = fig.axes[:2]
    plain, with_as = [line for line in loss_ax.get_lines() if len(line.get_xdata()) == 2]
    assert list(plain.get_xdata()) == [1, 2] and list(plain.get_ydata()) == [2.5, 1.5]  # mean of the two seeds
    assert list(with_as.get_ydata()) == [1.5, 0.5]
    acc_plain = next(line for line in acc_ax.get_lines() if len(line.get_xdata()) == 2)
    assert list(acc_plain.get_ydata()) == pytest.approx([55.0, 80.0])  # test accuracy in %
    band = loss_ax.collections[0].get_paths()[0].vertices[:, 1]  # mean ± 1 std: 2.5 ± 0.707, 1.5 ± 0.707
    assert min(band) == pytest.approx(1.5 - 0.5**0.5) and max(band) == pytest.approx(2.5 + 0.5**0.5)
    assert loss_ax.get_legend().get_title().get_text() == "mean, band ± 1 std over n seeds"
    assert legend_texts(loss_ax) == ["no AS, n = 2 seeds", "AS (λ = 0.8), n = 1 seed"]
    assert to_rgba(plain.get_color()) == BLUE and to_rgba(with_as.get_color()) == RED
    no_history = [Record(**{**{k: getattr(r, k) for k in ("run_id", "sweep", "stage", "data", "model", "bayesian",
                                                            "lam", "as_on", "fine_tuned", "seed")}, **r.metrics})
                  for r in records]
    assert training_curves_figure(no_history) == NO_HISTORY


def test_reliability_per_group_pools_the_bins_of_its_seeds():
    one = {"count": [0, 2, 2], "confidence": [None, 0.5, 0.9], "accuracy": [None, 0.5, 1.0]}
    two = {"count": [0, 6, 0], "confidence": [None, 0.6, None], "accuracy": [None, 0.0, None]}
    pooled = pooled_reliability([rec("a", reliability=one), rec("b", seed=1, reliability=two)])
    assert pooled["count"] == [0, 8, 2] and pooled["accuracy"][0] is None
    assert pooled["confidence"] == pytest.approx([None, (2 * 0.5 + 6 * 0.6) / 8, 0.9])
    assert pooled["accuracy"] == pytest.approx([None, 1 / 8, 1.0])
    fig = reliability_figure([rec("a", reliability=one, ece=0.1), rec("b", seed=1, reliability=two, ece=0.3),
                              rec("c", lam=0.8, reliability=one)])
    ax = fig.axes[0]
    plain = [line for line in ax.get_lines() if to_rgba(line.get_color()) == BLUE]
    assert len(plain) == 1 and list(plain[0].get_ydata()) == pytest.approx([1 / 8, 1.0])
    assert any(to_rgba(line.get_color()) == RED for line in ax.get_lines())
    texts = legend_texts(ax)
    assert "no AS, n = 2 seeds, ECE 0.2000 ± 0.1414" in texts and "perfect calibration" in texts
    assert "± 1 std over n seeds" in ax.get_legend().get_title().get_text()
    assert reliability_figure([rec("a")]) == NO_RELIABILITY  # e.g. records from W&B


def points(ax) -> list:
    """The data lines of an axes: (xs, linestyle) of every line with data (errorbar markers and joins)."""
    return [(list(line.get_xdata()), line.get_linestyle()) for line in ax.get_lines() if len(line.get_xdata())]


def test_the_lambda_plot_shows_two_lambdas_as_points_with_labelled_error_bars_not_a_line():
    records = [rec("a0", ensemble=80.0), rec("a1", seed=1, ensemble=82.0), rec("b0", lam=0.8, ensemble=90.0),
               rec("b1", lam=0.8, seed=1, ensemble=91.0)]
    fig = lambda_influence_figure(records)
    ax = fig.axes[0]
    assert all(len(xs) == 1 and style == "None" for xs, style in points(ax))  # markers only: nothing joins them
    markers = {xs[0]: line for line in ax.get_lines() if len(xs := list(line.get_xdata()))}
    assert to_rgba(markers[0.0].get_color()) == BLUE and to_rgba(markers[0.8].get_color()) == RED
    caps = ax.containers  # errorbar containers: mean and the bar of ± 1 std
    bar = caps[0].lines[2][0].get_segments()[0]
    assert [y for _, y in bar] == pytest.approx([81.0 - 2**0.5, 81.0 + 2**0.5])
    assert ax.get_legend().get_title().get_text() == "error bars: ± 1 std over n seeds"
    assert legend_texts(ax) == ["ResNet20, n = 2 seeds", "no AS (λ = 0)", "AS (λ > 0)"]
    assert list(ax.get_xticks()) == [0.0, 0.8]
    three = lambda_influence_figure([*records, rec("c0", lam=0.5, ensemble=85.0)]).axes[0]
    joined = [xs for xs, style in points(three) if len(xs) > 1]
    assert joined == [[0.0, 0.5, 0.8]]  # three lambdas or more: a line through the means


def test_every_figure_colours_a_method_the_same_way():
    records = [rec("a", reliability={"count": [1], "confidence": [0.5], "accuracy": [1.0]}),
               rec("b", lam=0.8, reliability={"count": [1], "confidence": [0.7], "accuracy": [1.0]})]
    figures = {"training": training_curves_figure(records), "retained": retained_curves_figure(records),
               "reliability": reliability_figure(records)}
    for name, fig in figures.items():
        legend = fig.axes[0].get_legend()
        colors = {t.get_text(): to_rgba(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles,
                                                                         strict=True) if "AS" in t.get_text()}
        assert colors == {k: BLUE if k.startswith("no AS") else RED for k in colors} and len(colors) == 2, name
        if name != "reliability":
            assert legend.get_title().get_text().endswith("± 1 std over n seeds"), name
    violins = sample_accuracy_distribution_figure(records).axes[0]
    assert [to_rgba(c.get_facecolor()[0]) for c in violins.collections if len(c.get_offsets()) == 2][:2] == [
        pytest.approx((*BLUE[:3], 0.8)), pytest.approx((*RED[:3], 0.8))]
    assert [t.get_text().splitlines()[1] for t in violins.get_xticklabels()] == ["2 samples, 1 seed"] * 2
    # several lambdas in one panel: shades of the method's colour, light to dark
    shades = [method_color(True, i, 3) for i in range(3)]
    assert len(set(shades)) == 3 and all(s[0] > s[2] for s in shades)  # reds

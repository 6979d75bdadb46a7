"""Uncertainty and calibration metrics of (Bayesian) classifiers, each a small function with a known answer.

Conventions used throughout:
  - probabilities are N x C tensors of softmax outputs, labels are N integer class indices;
  - accuracies and error rates are fractions in [0, 1], not percentages;
  - an uncertainty score is "lower = more certain" (and, for OOD detection, "higher = more OOD");
  - entropies use the natural log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

SCORES: tuple[str, ...] = ("entropy", "mutual_information", "max_prob")
DEFAULT_FRACTIONS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-example entropy H(p) = -sum_c p_c log p_c over the last dim (natural log, 0 * log 0 = 0).

    `probs` is (..., C); returns (...) in float32 (or float64 if given float64).
    """
    p = probs if probs.dtype == torch.float64 else probs.float()
    return -torch.special.xlogy(p, p).sum(dim=-1)  # xlogy(0, 0) = 0


class Uncertainty(NamedTuple):
    """Per-example decomposition of predictive uncertainty (each an N tensor, nats)."""

    total: torch.Tensor  # H(E_w[p(y|x,w)]): entropy of the mean prediction
    aleatoric: torch.Tensor  # E_w[H(p(y|x,w))]: mean of the per-sample entropies
    epistemic: torch.Tensor  # total - aleatoric = mutual information I(y; w | x)


def predictive_uncertainty(mean_probs: torch.Tensor, mean_entropy: torch.Tensor) -> Uncertainty:
    """Split the predictive entropy into aleatoric and epistemic parts.

    total = H(mean_probs); aleatoric = mean_entropy (the average over weight samples of each sample's
    entropy); epistemic = total - aleatoric, the mutual information between label and weights. The mutual
    information is >= 0 by Jensen's inequality, so float rounding below 0 is clamped to 0.
    """
    total = entropy(mean_probs)
    aleatoric = mean_entropy.to(total.dtype)
    return Uncertainty(total, aleatoric, (total - aleatoric).clamp_min(0.0))


def _predicted_class(probs_or_pred: torch.Tensor) -> torch.Tensor:
    """Argmax over classes for an N x C tensor; an N tensor is taken as the predictions themselves."""
    if probs_or_pred.dim() == 2:
        return probs_or_pred.argmax(dim=-1)
    if probs_or_pred.dim() == 1:
        return probs_or_pred
    raise ValueError(f"expected N x C probabilities or N predictions, got shape {tuple(probs_or_pred.shape)}")


def accuracy(probs_or_pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction in [0, 1] of examples whose predicted class (argmax of N x C scores, or the given N class
    indices) equals the label."""
    pred = _predicted_class(probs_or_pred)
    if pred.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"need matching non-empty predictions and labels, got {tuple(pred.shape)}, "
                         f"{tuple(labels.shape)}")
    # exact count / N in float64, so it agrees with per-sample accuracies computed from counts
    return int((pred == labels.to(pred.device)).sum()) / labels.numel()


def certainty_score(kind: str, mean_probs: torch.Tensor, mean_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example uncertainty score, LOWER = MORE CERTAIN (higher = more likely OOD).

    - "entropy": total predictive entropy H(mean_probs);
    - "mutual_information": H(mean_probs) - mean_entropy (epistemic part; needs `mean_entropy`);
    - "max_prob": -max_c mean_probs (negated so that the ordering convention holds).
    """
    if kind == "entropy":
        return entropy(mean_probs)
    if kind == "mutual_information":
        if mean_entropy is None:
            raise ValueError("score 'mutual_information' needs mean_entropy")
        return predictive_uncertainty(mean_probs, mean_entropy).epistemic
    if kind == "max_prob":
        return -mean_probs.float().amax(dim=-1)
    raise ValueError(f"score must be one of {SCORES}, got {kind!r}")


def _most_certain_first(score: torch.Tensor) -> torch.Tensor:
    """Indices ordering examples by ascending score; ties keep index order (stable sort)."""
    return torch.sort(score, stable=True).indices


def retained_accuracy(
    correct: torch.Tensor, score: torch.Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[float, float]:
    """Accuracy on the most certain fraction X of examples, for each X in `fractions`.

    Examples are sorted by `score` ascending (lower = more certain; pass e.g. -max_prob, or use
    `certainty_score`), ties broken by index. The k = max(1, floor(X * N + 1/2)) first examples (X * N
    rounded half up) are kept and their fraction correct is returned as {X: accuracy}.
    """
    correct, n = _check_pair(correct, score)
    kept_correct = correct[_most_certain_first(score.to(correct.device))].float()
    # cumulative accuracy at every k, so each fraction is a lookup
    running = kept_correct.cumsum(0) / torch.arange(1, n + 1, device=correct.device)
    result = {}
    for x in fractions:
        if not 0.0 < x <= 1.0:
            raise ValueError(f"fractions must lie in (0, 1], got {x}")
        k = max(1, min(n, math.floor(x * n + 0.5)))
        result[x] = running[k - 1].item()
    return result


class ReliabilityBins(NamedTuple):
    """Per confidence bin: number of examples, sum of their confidences, number of them correct."""

    count: torch.Tensor
    confidence_sum: torch.Tensor
    correct_sum: torch.Tensor


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Equal-width bins on the confidence max_c p_c: bin b covers (b / n_bins, (b + 1) / n_bins], the first
    bin also includes 0; the prediction is the argmax (float64 sums)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.double().max(dim=-1)
    correct, _n = _check_pair(pred == labels.to(pred.device), conf)
    inner_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)[1:-1]
    # right=False: index i satisfies edge[i-1] < conf <= edge[i], i.e. (lo, hi] bins, 0 falls in bin 0
    bin_index = torch.bucketize(conf, inner_edges, right=False)
    return ReliabilityBins(
        count=torch.bincount(bin_index, minlength=n_bins).double(),
        confidence_sum=torch.bincount(bin_index, weights=conf, minlength=n_bins),
        correct_sum=torch.bincount(bin_index, weights=correct.double(), minlength=n_bins),
    )


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b (n_b / N) * |acc_b - conf_b| over the equal-width confidence bins of `reliability_bins`
    (acc_b and conf_b: mean correctness and confidence of the n_b examples in bin b; empty bins add 0)."""
    bins = reliability_bins(probs, labels, n_bins)
    # |acc_b - conf_b| * n_b / N == |correct_sum_b - conf_sum_b| / N, which is 0 for empty bins
    return ((bins.correct_sum - bins.confidence_sum).abs().sum() / bins.count.sum()).item()


def reliability_diagram_data(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list]:
    """JSON-ready reliability diagram: per bin its count, mean confidence and accuracy (None when empty)."""
    bins = reliability_bins(probs, labels, n_bins)
    mean = lambda total: [(t / c).item() if c > 0 else None for t, c in zip(total, bins.count, strict=True)]  # noqa: E731
    return {"count": [int(c) for c in bins.count], "confidence": mean(bins.confidence_sum),
            "accuracy": mean(bins.correct_sum)}


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor, min_prob: float = 1e-12) -> float:
    """Mean over examples of -log p_{label}, with p clamped below at `min_prob` so a zero gives a finite
    (large) value."""
    p_label = _label_probs(probs, labels)
    return -p_label.clamp_min(min_prob).log().mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of sum_c (p_c - onehot(label)_c)^2 (ranges from 0 to 2)."""
    _label_probs(probs, labels)  # shape checks
    p = probs.double()
    onehot = torch.nn.functional.one_hot(labels.to(p.device).long(), p.shape[-1]).double()
    return (p - onehot).pow(2).sum(dim=-1).mean().item()


def aurc(correct: torch.Tensor, score: torch.Tensor) -> float:
    """Area under the risk-coverage curve.

    Sort by `score` ascending (most certain first, ties by index); the risk at coverage k / N is the error
    rate among the first k examples; AURC = (1 / N) * sum_{k=1..N} risk_k. Lower is better.
    """
    correct, n = _check_pair(correct, score)
    errors = (~correct[_most_certain_first(score.to(correct.device))]).double()
    risk = errors.cumsum(0) / torch.arange(1, n + 1, device=errors.device, dtype=torch.float64)
    return risk.mean().item()


def ood_auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC for telling OOD (positive) from in-distribution examples by an uncertainty score
    (higher = more OOD).

    Equals the Mann-Whitney U statistic P(s_out > s_in) + 0.5 * P(s_out = s_in) over all (in, out) pairs,
    computed from average ranks of the pooled scores: (R_out - n_out (n_out + 1) / 2) / (n_in n_out).
    """
    s_in, s_out = score_in.double().flatten(), score_out.double().flatten()
    n_in, n_out = s_in.numel(), s_out.numel()
    if n_in == 0 or n_out == 0:
        raise ValueError("ood_auroc needs at least one in-distribution and one OOD score")
    ranks = _average_ranks(torch.cat([s_in, s_out.to(s_in.device)]))
    rank_sum_out = ranks[n_in:].sum()
    return ((rank_sum_out - n_out * (n_out + 1) / 2) / (n_in * n_out)).item()


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values` (ascending), tied values sharing the mean of the ranks they span."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()  # a tie group spans ranks last - count + 1 .. last
    group_rank = last_rank - (counts.double() - 1) / 2
    return group_rank[inverse]


def _check_pair(correct: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Validate N correctness flags against N scores; returns (bool flags, N)."""
    if correct.dim() != 1 or correct.shape != score.shape or correct.numel() == 0:
        raise ValueError(f"need matching non-empty 1-d tensors, got {tuple(correct.shape)}, {tuple(score.shape)}")
    return correct.bool(), correct.numel()


def _label_probs(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_{label} per example, in float64."""
    if probs.dim() != 2 or labels.shape != probs.shape[:1] or labels.numel() == 0:
        raise ValueError(f"need N x C probs and N labels, got {tuple(probs.shape)}, {tuple(labels.shape)}")
    return probs.double().gather(1, labels.to(probs.device).long().unsqueeze(1)).squeeze(1)



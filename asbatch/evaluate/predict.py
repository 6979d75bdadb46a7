"""Monte-Carlo prediction over weight samples, and the metrics dict of a run's final evaluation.

`predict` runs S weight samples over a whole test set; each sample is drawn once from a seeded generator
and held fixed for every batch, so "sample accuracy" is the accuracy of one concrete network. Only
per-example summaries are kept (mean softmax, mean entropy), never S x N x C unless asked for.
`evaluate` turns those summaries into a JSON-ready dict (metrics from `asbatch.evaluate.metrics`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from asbatch.bayes import bayesian_weights, is_bayesian, sample_noise
from asbatch.evaluate.metrics import (
    DEFAULT_FRACTIONS,
    SCORES,
    accuracy,
    aurc,
    brier_score,
    certainty_score,
    entropy,
    expected_calibration_error,
    negative_log_likelihood,
    ood_auroc,
    predictive_uncertainty,
    reliability_diagram_data,
    retained_accuracy,
)
from asbatch.names import derived_seed


@dataclass
class Predictions:
    """Per-example summaries of S weight samples on N examples (all on CPU).

    mean_probs:     N x C, mean over samples of the softmax (float32).
    mean_entropy:   N, mean over samples of each sample's predictive entropy (the aleatoric term).
    labels:         N, the true labels.
    sample_correct: S, number of examples classified correctly by each weight sample (int64).
    num_examples:   N.
    sample_probs:   S x N x C per-sample softmax, only with predict(..., keep_samples=True), else None.
    """

    mean_probs: torch.Tensor
    mean_entropy: torch.Tensor
    labels: torch.Tensor
    sample_correct: torch.Tensor
    num_examples: int
    sample_probs: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return int(self.sample_correct.numel())

    @property
    def sample_accuracies(self) -> list[float]:
        """Accuracy (fraction in [0, 1]) of each weight sample."""
        return (self.sample_correct.double() / self.num_examples).tolist()

    def score(self, kind: str) -> torch.Tensor:
        """`certainty_score(kind, ...)` for these predictions (lower = more certain)."""
        return certainty_score(kind, self.mean_probs, self.mean_entropy)


def sample_seed(seed: int, sample: int) -> int:
    """Seed of the generator that draws weight sample `sample` for run seed `seed`."""
    return derived_seed(seed, sample)


@contextlib.contextmanager
def _eval_state(model: nn.Module) -> Iterator[None]:
    """model.eval() for the duration; afterwards restore the training flags and every Bayesian weight's
    noise mode and held eps (evaluation must not disturb a training loop that holds noise)."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    noise = [(g, g.mode, g.eps) for _, _, g in bayesian_weights(model)]
    model.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, training, strict=True):
            m.training = flag
        for g, mode, eps in noise:
            g.mode, g.eps = mode, eps


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class _Accumulator:
    """Running per-example sums over weight samples (one sample's N x C probabilities at a time)."""

    def __init__(self) -> None:
        self.prob_sum: torch.Tensor | None = None
        self.entropy_sum: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.correct: list[int] = []

    def add_sample(self, batch_probs: list[torch.Tensor], batch_labels: list[torch.Tensor]) -> torch.Tensor:
        """Add one weight sample's per-batch probabilities; returns its N x C probabilities."""
        if not batch_probs:
            raise ValueError("batches yielded no data (an exhausted iterator cannot be re-iterated; pass a list "
                             "or a DataLoader)")
        probs, labels = torch.cat(batch_probs), torch.cat(batch_labels)
        if self.labels is None:
            self.prob_sum, self.entropy_sum = torch.zeros_like(probs), torch.zeros_like(probs[:, 0])
            self.labels = labels
        elif not torch.equal(labels, self.labels):
            # every sample must see the same examples in the same order, or the per-example sums are garbage
            raise ValueError("batches differ between passes (shuffled or exhausted?); use a fixed, re-iterable "
                             "order for evaluation")
        self.prob_sum += probs
        self.entropy_sum += entropy(probs)
        self.correct.append(int((probs.argmax(dim=-1) == labels).sum()))
        return probs


def _forward_probs(model: nn.Module, batches: Iterable, device: torch.device,
                   on_batch: Callable[[], None] | None = None) -> tuple[list, list]:
    """Softmax (float32) and labels of every batch for the model's current weights."""
    probs, labels = [], []
    for batch in batches:
        if on_batch is not None:
            on_batch()
        x, y = batch[0], batch[1]
        logits = model(x.to(device))
        # softmax in float32 even under half / bfloat16 logits, so tiny probabilities do not flush to 0
        probs.append(logits.float().softmax(dim=-1))
        labels.append(y.to(device).long())
    return probs, labels


def predict(
    model: nn.Module,
    batches: Iterable,
    num_samples: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    keep_samples: bool = False,
    on_batch: Callable[[], None] | None = None,
) -> Predictions:
    """Monte-Carlo prediction with `num_samples` weight samples, each fixed over the whole data set.

    `batches` is a re-iterable of (x, y) batches in a fixed order (a list, or a non-shuffling DataLoader);
    it is traversed once per weight sample. Sample s draws eps from a generator on the model's device seeded
    with `sample_seed(seed, s)` = `asbatch.names.derived_seed(seed, s)` (the same on every CPU; a GPU's
    generator gives other, equally reproducible, draws),
    and runs under no_grad and `parametrize.cached()`, so every weight is computed once per sample. A deterministic
    (non-Bayesian) model is run once: S = 1. The model runs in eval mode; its training flags and noise
    state are restored afterwards. `device` defaults to the model's device. Memory is O(N x C) whatever
    S is; `keep_samples=True` also returns the S x N x C per-sample probabilities. `on_batch` is called before
    every batch (a training loop raises from it to stop a long evaluation when asked to; the model's state is
    restored all the same).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = torch.device(device) if device is not None else _model_device(model)
    bayesian = is_bayesian(model)
    num_samples = num_samples if bayesian else 1
    acc = _Accumulator()
    kept: list[torch.Tensor] = []
    with _eval_state(model), torch.no_grad():
        for s in range(num_samples):
            if bayesian:  # drawn on the model's device: one randn, no host-to-device copy
                generator = torch.Generator(device=_model_device(model)).manual_seed(sample_seed(seed, s))
                sample_noise(model, generator)
            with parametrize.cached():
                probs = acc.add_sample(*_forward_probs(model, batches, device, on_batch))
            if keep_samples:
                kept.append(probs.cpu())
    return Predictions(
        mean_probs=(acc.prob_sum / num_samples).cpu(),
        mean_entropy=(acc.entropy_sum / num_samples).cpu(),
        labels=acc.labels.cpu(),
        sample_correct=torch.tensor(acc.correct, dtype=torch.int64),
        num_examples=int(acc.labels.numel()),
        sample_probs=torch.stack(kept) if keep_samples else None,
    )


# ------------------------------------------------------------------------------------------ evaluation


def summarize(
    pred: Predictions,
    score: str = "entropy",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ood: Predictions | None = None,
) -> dict:
    """The metrics dict of `evaluate` for given predictions (and optional OOD predictions)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    sample_acc = pred.sample_accuracies
    unc = predictive_uncertainty(pred.mean_probs, pred.mean_entropy)
    correct = pred.mean_probs.argmax(dim=-1) == pred.labels
    in_score = pred.score(score)
    result = {
        "num_samples": pred.num_samples,
        "num_examples": pred.num_examples,
        "sample_accuracies": sample_acc,
        "lowest_accuracy": min(sample_acc),
        "highest_accuracy": max(sample_acc),
        "mean_accuracy": sum(sample_acc) / len(sample_acc),
        "ensemble_accuracy": accuracy(pred.mean_probs, pred.labels),
        "total_uncertainty": unc.total.mean().item(),
        "aleatoric_uncertainty": unc.aleatoric.mean().item(),
        "epistemic_uncertainty": unc.epistemic.mean().item(),
        "score": score,
        "retained_accuracy": {str(float(x)): a for x, a in retained_accuracy(correct, in_score, fractions).items()},
        "ece": expected_calibration_error(pred.mean_probs, pred.labels),
        "reliability": reliability_diagram_data(pred.mean_probs, pred.labels),
        "nll": negative_log_likelihood(pred.mean_probs, pred.labels),
        "brier": brier_score(pred.mean_probs, pred.labels),
        "aurc": aurc(correct, in_score),
    }
    if ood is not None:
        result["ood_auroc"] = ood_auroc(in_score, ood.score(score))
    return result


def evaluate(
    model: nn.Module,
    batches: Iterable,
    num_samples: int,
    seed: int = 0,
    ood_batches: Iterable | None = None,
    score: str = "entropy",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    device: torch.device | str | None = None,
    on_batch: Callable[[], None] | None = None,
) -> dict:
    """Predict with `num_samples` weight samples and return JSON-serialisable metrics (floats, lists).

    Keys: num_samples, num_examples, sample_accuracies (one per weight sample), lowest_accuracy,
    highest_accuracy, mean_accuracy (over samples), ensemble_accuracy (argmax of the mean softmax);
    total_uncertainty, aleatoric_uncertainty, epistemic_uncertainty (means over examples, nats);
    score (its name), retained_accuracy ({"0.2": acc, ...}: ensemble accuracy on the most certain fraction
    by that score); ece, nll, brier, aurc of the ensemble prediction; and ood_auroc (only with
    `ood_batches`, predicted with the same seed, OOD = positive, score higher = more OOD). Every accuracy
    is a fraction in [0, 1].
    """
    if score not in SCORES:  # fail before the expensive prediction
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    pred = predict(model, batches, num_samples, seed=seed, device=device, on_batch=on_batch)
    ood = None
    if ood_batches is not None:
        ood = predict(model, ood_batches, num_samples, seed=seed, device=device, on_batch=on_batch)
    return summarize(pred, score=score, fractions=fractions, ood=ood)

"""Evaluating (Bayesian) classifiers: S-sample prediction and the paper's metrics (lowest / highest /
ensembled accuracy, accuracy on the most certain data, calibration, OOD detection).

- `metrics`: small, separately tested metric functions with documented definitions;
- `predict`: `predict` (S weight samples over a test set) and `evaluate` (the JSON-ready metrics dict).
"""

from asbatch.evaluate.metrics import (
                                      DEFAULT_FRACTIONS,
                                      SCORES,
                                      ReliabilityBins,
                                      Uncertainty,
                                      accuracy,
                                      aurc,
                                      brier_score,
                                      certainty_score,
                                      entropy,
                                      expected_calibration_error,
                                      negative_log_likelihood,
                                      ood_auroc,
                                      predictive_uncertainty,
                                      reliability_bins,
                                      reliability_diagram_data,
                                      retained_accuracy,
)
from asbatch.evaluate.predict import Predictions, evaluate, predict, sample_seed, summarize

__all__ = ["DEFAULT_FRACTIONS", "SCORES", "Predictions", "ReliabilityBins", "Uncertainty", "accuracy", "aurc",
           "brier_score", "certainty_score", "entropy", "evaluate", "expected_calibration_error",
           "negative_log_likelihood", "ood_auroc", "predict", "predictive_uncertainty", "reliability_bins",
           "reliability_diagram_data", "retained_accuracy", "sample_seed", "summarize"]

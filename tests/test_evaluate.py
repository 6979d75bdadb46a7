"""Evaluation metrics (known answers on hand-made predictions) and Monte-Carlo prediction of tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from asbatch import bayes
from asbatch.evaluate import (
    accuracy,
    aurc,
    brier_score,
    certainty_score,
    entropy,
    evaluate,
    expected_calibration_error,
    negative_log_likelihood,
    ood_auroc,
    predict,
    predictive_uncertainty,
    retained_accuracy,
    summarize,
)

T = torch.tensor


# ----------------------------------------------------------------------------------------------- metrics


def test_entropy_of_uniform_over_4_classes_is_log4():
    assert entropy(torch.full((1, 4), 0.25)).item() == pytest.approx(math.log(4))


def test_entropy_of_one_hot_is_zero_not_nan():
    h = entropy(T([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]))
    # row 2: -(0.5 ln 0.5 + 0.5 ln 0.5 + 0 ln 0) = ln 2
    assert h.tolist() == pytest.approx([0.0, math.log(2)])


def test_mutual_information_is_zero_when_all_samples_agree():
    p = T([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    # every sample predicts p, so the mean entropy is H(p) itself
    unc = predictive_uncertainty(p, entropy(p))
    assert unc.epistemic.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    assert unc.total.tolist() == pytest.approx(unc.aleatoric.tolist())


def test_mutual_information_of_two_confident_disagreeing_samples_is_log2():
    samples = T([[[1.0, 0.0]], [[0.0, 1.0]]])  # S=2, N=1, C=2
    unc = predictive_uncertainty(samples.mean(0), entropy(samples).mean(0))
    # total = H([0.5, 0.5]) = ln 2, aleatoric = mean(0, 0) = 0, epistemic = ln 2
    assert unc.total.item() == pytest.approx(math.log(2))
    assert unc.aleatoric.item() == pytest.approx(0.0)
    assert unc.epistemic.item() == pytest.approx(math.log(2))


def test_accuracy_accepts_probabilities_or_class_indices():
    probs = T([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = T([0, 0, 0])
    assert accuracy(probs, labels) == pytest.approx(2 / 3)  # argmax = 0, 1, 0
    assert accuracy(T([1, 1, 0]), labels) == pytest.approx(1 / 3)


def test_certainty_scores_are_lower_for_more_certain_examples():
    probs = T([[0.9, 0.1], [0.5, 0.5]])
    assert certainty_score("max_prob", probs).tolist() == pytest.approx([-0.9, -0.5])
    h = certainty_score("entropy", probs)
    assert h[0] < h[1] and h[1].item() == pytest.approx(math.log(2))
    # MI = H(mean) - mean entropy: here 0.2 nats of aleatoric out of H(probs)
    mi = certainty_score("mutual_information", probs, entropy(probs) - 0.2)
    assert mi.tolist() == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError):
        certainty_score("mutual_information", probs)
    with pytest.raises(ValueError):
        certainty_score("variance", probs)


def test_retained_accuracy_keeps_most_certain_first():
    correct = T([True, False, True, True, False])
    score = T([0.1, 0.5, 0.2, 0.3, 0.05])
    # ascending score order: idx 4 (wrong), 0 (ok), 2 (ok), 3 (ok), 1 (wrong)
    # keep 1: 0/1; keep 2: 1/2; keep 3: 2/3; keep 4: 3/4; keep 5: 3/5
    got = retained_accuracy(correct, score)
    assert list(got) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert list(got.values()) == pytest.approx([0.0, 0.5, 2 / 3, 0.75, 0.6])


def test_retained_accuracy_breaks_ties_by_index_and_keeps_at_least_one():
    correct = T([True, False, False, False])
    score = torch.zeros(4)
    # all tied -> index order; 0.1 * 4 = 0.4 rounds to 0 but at least 1 example is kept (idx 0, correct)
    # 0.5 * 4 = 2 -> idx 0, 1 -> 1/2
    got = retained_accuracy(correct, score, fractions=(0.1, 0.5))
    assert got == {0.1: 1.0, 0.5: 0.5}


def test_retained_accuracy_rounds_half_up():
    correct = T([True, True, False, False])
    score = T([0.0, 1.0, 2.0, 3.0])
    # 0.375 * 4 = 1.5 -> keep 2 (both correct) -> 1.0; 0.625 * 4 = 2.5 -> keep 3 -> 2/3
    got = retained_accuracy(correct, score, fractions=(0.375, 0.625))
    assert list(got.values()) == pytest.approx([1.0, 2 / 3])


def test_ece_of_hand_made_predictions_matches_hand_computation():
    probs = T([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.85, 0.1, 0.05]])
    labels = T([0, 1, 1, 2])
    # conf / correct: 0.9 ok, 0.7 wrong, 0.5 ok, 0.85 wrong; 5 bins of width 0.2
    # bin (0.8, 1]: n=2, acc 0.5, conf 0.875 -> 2/4 * 0.375 = 0.1875
    # bin (0.6, 0.8]: n=1, acc 0, conf 0.7 -> 1/4 * 0.7 = 0.175
    # bin (0.4, 0.6]: n=1, acc 1, conf 0.5 -> 1/4 * 0.5 = 0.125
    # ECE = 0.1875 + 0.175 + 0.125 = 0.4875
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.4875)


def test_ece_bins_are_closed_on_the_right():
    probs = T([[0.5, 0.5], [0.6, 0.4]])
    labels = T([0, 1])
    # conf 0.5 (correct, argmax picks class 0) lies in (0.25, 0.5], conf 0.6 (wrong) in (0.5, 0.75]:
    # ECE = 1/2 * |1 - 0.5| + 1/2 * |0 - 0.6| = 0.25 + 0.3 = 0.55
    # ([lo, hi) bins would put both in [0.5, 0.75): |0.5 - 0.55| = 0.05)
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.55)


def test_ece_matches_a_loop_over_bins_on_random_predictions():
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 10, generator=gen).mul(3).softmax(-1)
    labels = torch.randint(0, 10, (500,), generator=gen)
    conf, pred = probs.max(-1)
    expected = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        in_bin = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if in_bin.any():
            gap = (pred[in_bin] == labels[in_bin]).float().mean() - conf[in_bin].mean()
            expected += in_bin.float().mean().item() * abs(gap.item())
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)


def test_nll_of_hand_made_predictions_is_mean_minus_log_label_prob():
    probs = T([[0.5, 0.5], [0.25, 0.75]])
    labels = T([0, 0])
    # (-ln 0.5 - ln 0.25) / 2 = (ln 2 + ln 4) / 2 = 1.5 ln 2
    assert negative_log_likelihood(probs, labels) == pytest.approx(1.5 * math.log(2))


def test_nll_of_zero_label_probability_is_finite():
    nll = negative_log_likelihood(T([[1.0, 0.0]]), T([1]))
    assert math.isfinite(nll) and nll == pytest.approx(-math.log(1e-12))


def test_brier_score_of_hand_made_predictions():
    probs = T([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = T([0, 2])
    # row 1: 0.3^2 + 0.2^2 + 0.1^2 = 0.14; row 2: 0.5^2 + 0.5^2 + 1^2 = 1.5; mean = 0.82
    assert brier_score(probs, labels) == pytest.approx(0.82)


def test_aurc_of_perfect_ranking_is_lower_than_of_reversed_ranking():
    correct = T([True, True, False])
    # errors last: risks 0, 0, 1/3 -> AURC = (1/3) / 3 = 1/9
    assert aurc(correct, T([0.1, 0.2, 0.3])) == pytest.approx(1 / 9)
    # errors first: risks 1, 1/2, 1/3 -> AURC = (11/6) / 3 = 11/18
    assert aurc(correct, T([0.3, 0.2, 0.1])) == pytest.approx(11 / 18)


def test_aurc_matches_a_loop_over_coverages_on_random_data():
    gen = torch.Generator().manual_seed(1)
    correct = torch.rand(200, generator=gen) < 0.7
    score = torch.rand(200, generator=gen)
    order = sorted(range(200), key=lambda i: score[i].item())
    risks = [sum(not correct[i] for i in order[:k]) / k for k in range(1, 201)]
    assert aurc(correct, score) == pytest.approx(sum(risks) / 200)


def test_ood_auroc_counts_ties_as_half():
    # pairs (out, in): (0.5, 0.1) 1, (0.5, 0.5) 0.5, (0.9, 0.1) 1, (0.9, 0.5) 1 -> 3.5 / 4
    assert ood_auroc(T([0.1, 0.5]), T([0.5, 0.9])) == pytest.approx(0.875)
    assert ood_auroc(T([0.1, 0.2]), T([0.3, 0.4])) == 1.0
    assert ood_auroc(T([0.3, 0.4]), T([0.1, 0.2])) == 0.0


def test_ood_auroc_matches_sklearn_on_random_scores():
    gen = torch.Generator().manual_seed(2)
    # rounded to one decimal so that there are many ties
    s_in = (torch.rand(300, generator=gen) * 10).round() / 10
    s_out = (torch.rand(200, generator=gen) * 10 + 2).round() / 10
    reference = roc_auc_score([0] * 300 + [1] * 200, torch.cat([s_in, s_out]).numpy())
    assert 0.5 < reference < 1.0
    assert ood_auroc(s_in, s_out) == pytest.approx(reference, abs=1e-12)


# -------------------------------------------------------------------------------------- predict / evaluate


def _data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(size), y.split(size), strict=True))


def _deterministic_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def _bayesian_model() -> nn.Module:
    return bayes.make_bayesian(_deterministic_model(), init_sigma=0.5)


def test_predict_is_reproducible_for_a_seed_and_changes_with_the_seed():
    model, (x, y) = _bayesian_model(), _data()
    a = predict(model, _batches(x, y, 16), num_samples=4, seed=3)
    b = predict(model, _batches(x, y, 16), num_samples=4, seed=3)
    c = predict(model, _batches(x, y, 16), num_samples=4, seed=4)
    assert torch.equal(a.mean_probs, b.mean_probs) and torch.equal(a.sample_correct, b.sample_correct)
    assert not torch.allclose(a.mean_probs, c.mean_probs)


def test_sample_accuracy_equals_a_manual_run_of_that_weight_sample_over_the_whole_set():
    model, (x, y) = _bayesian_model(), _data()
    pred = predict(model, _batches(x, y, 16), num_samples=3, seed=7)
    manual = []
    for s in range(3):
        bayes.sample_noise(model, torch.Generator().manual_seed(7 * 1_000_003 + s))
        with torch.no_grad():
            manual.append(int((model(x).argmax(-1) == y).sum()))
    assert pred.sample_correct.tolist() == manual
    assert pred.sample_accuracies == pytest.approx([m / 60 for m in manual])
    assert len(set(manual)) > 1 or len(set(pred.mean_probs.argmax(-1).tolist())) > 1  # samples really differ


def test_streaming_over_batches_equals_one_big_batch():
    model, (x, y) = _bayesian_model(), _data()
    streamed = predict(model, _batches(x, y, 7), num_samples=5, seed=1)
    whole = predict(model, [(x, y)], num_samples=5, seed=1)
    assert torch.allclose(streamed.mean_probs, whole.mean_probs, atol=1e-6)
    assert torch.allclose(streamed.mean_entropy, whole.mean_entropy, atol=1e-6)
    assert torch.equal(streamed.labels, y) and torch.equal(streamed.sample_correct, whole.sample_correct)
    assert streamed.num_examples == 60 and streamed.mean_probs.shape == (60, 3)


def test_deterministic_model_is_run_once_and_all_accuracies_agree():
    model, (x, y) = _deterministic_model(), _data()
    result = evaluate(model, _batches(x, y, 16), num_samples=5)
    assert result["num_samples"] == 1 and len(result["sample_accuracies"]) == 1
    expected = accuracy(model(x), y)
    assert result["lowest_accuracy"] == result["highest_accuracy"] == result["ensemble_accuracy"]
    assert result["ensemble_accuracy"] == pytest.approx(expected)
    assert result["epistemic_uncertainty"] == pytest.approx(0.0, abs=1e-6)


def test_training_flag_noise_mode_and_held_eps_are_restored():
    model, (x, y) = _bayesian_model(), _data()
    model.train()
    bayes.set_noise_mode(model, "sample")
    predict(model, _batches(x, y, 16), num_samples=2)
    assert model.training and all(m.training for m in model.modules())
    assert [g.mode for _, _, g in bayes.bayesian_weights(model)] == ["sample", "sample"]

    held = bayes.sample_noise(model, torch.Generator().manual_seed(123))
    model.eval()
    predict(model, _batches(x, y, 16), num_samples=2)
    assert not model.training
    assert all(a is b for a, b in zip(bayes.get_noise(model), held, strict=True))
    assert [g.mode for _, _, g in bayes.bayesian_weights(model)] == ["fixed", "fixed"]


def test_ensemble_accuracy_is_accuracy_of_mean_of_kept_sample_probs():
    model, (x, y) = _bayesian_model(), _data()
    batches = _batches(x, y, 16)
    pred = predict(model, batches, num_samples=6, seed=2, keep_samples=True)
    assert pred.sample_probs.shape == (6, 60, 3)
    assert torch.allclose(pred.sample_probs.mean(0), pred.mean_probs, atol=1e-6)
    assert torch.allclose(entropy(pred.sample_probs).mean(0), pred.mean_entropy, atol=1e-6)
    assert (pred.sample_probs.argmax(-1) == y).sum(-1).tolist() == pred.sample_correct.tolist()
    result = evaluate(model, batches, num_samples=6, seed=2)
    assert result["ensemble_accuracy"] == pytest.approx(accuracy(pred.sample_probs.mean(0).argmax(-1), y))
    assert predict(model, batches, num_samples=2).sample_probs is None


def test_lowest_highest_mean_and_ensemble_accuracy_of_hand_made_predictions():
    """S=3 weight samples, N=5 examples (labels 0 0 0 1 1), the argmax of each row worked out by hand."""
    from asbatch.evaluate.predict import Predictions

    sample_probs = T([
        [[.9, .1], [.9, .1], [.6, .4], [.4, .6], [.3, .7]],      # -> 0 0 0 1 1: 5 of 5 right
        [[.45, .55], [.4, .6], [.4, .6], [.2, .8], [.1, .9]],    # -> 1 1 1 1 1: 2 of 5 right
        [[.4, .6], [.45, .55], [.3, .7], [.8, .2], [.2, .8]],    # -> 1 1 1 0 1: 1 of 5 right
    ])
    labels = T([0, 0, 0, 1, 1])
    pred = Predictions(mean_probs=sample_probs.mean(0), mean_entropy=entropy(sample_probs).mean(0), labels=labels,
                       sample_correct=T([5, 2, 1]), num_examples=5, sample_probs=sample_probs)
    result = summarize(pred)
    assert result["sample_accuracies"] == pytest.approx([1.0, 0.4, 0.2])
    assert result["lowest_accuracy"] == pytest.approx(0.2)
    assert result["highest_accuracy"] == pytest.approx(1.0)
    assert result["mean_accuracy"] == pytest.approx((1.0 + 0.4 + 0.2) / 3)
    # mean probability of class 0: .5833 .5833 .4333 .4667 .2 -> 0 0 1 1 1: all but the third right
    assert result["ensemble_accuracy"] == pytest.approx(0.8)
    assert (result["num_samples"], result["num_examples"]) == (3, 5)


def test_evaluate_returns_json_serialisable_metrics_and_ood_auroc_only_with_ood_data():
    model, (x, y) = _bayesian_model(), _data()
    x_ood = torch.randn(40, 4, generator=torch.Generator().manual_seed(9)) * 6  # far from the data
    ood = _batches(x_ood, torch.zeros(40, dtype=torch.long), 16)
    result = evaluate(model, _batches(x, y, 16), num_samples=4, seed=5, ood_batches=ood, score="max_prob")
    json.dumps(result)
    assert result["score"] == "max_prob"
    assert list(result["retained_accuracy"]) == ["0.2", "0.4", "0.6", "0.8", "1.0"]
    assert result["retained_accuracy"]["1.0"] == pytest.approx(result["ensemble_accuracy"])
    assert result["lowest_accuracy"] <= result["mean_accuracy"] <= result["highest_accuracy"]
    assert result["total_uncertainty"] == pytest.approx(
        result["aleatoric_uncertainty"] + result["epistemic_uncertainty"], abs=1e-6)
    # ood_auroc is the AUROC of the chosen score on both predictions made with the same seed
    p_in = predict(model, _batches(x, y, 16), num_samples=4, seed=5)
    p_out = predict(model, ood, num_samples=4, seed=5)
    assert result["ood_auroc"] == pytest.approx(ood_auroc(-p_in.mean_probs.max(-1).values,
                                                          -p_out.mean_probs.max(-1).values))
    assert result == summarize(p_in, score="max_prob", ood=p_out)
    assert "ood_auroc" not in evaluate(model, _batches(x, y, 16), num_samples=2)


def test_predict_rejects_a_one_shot_iterator_for_several_samples():
    model, (x, y) = _bayesian_model(), _data()
    with pytest.raises(ValueError, match="exhausted iterator"):
        predict(model, iter(_batches(x, y, 16)), num_samples=2)


def test_softmax_is_float32_for_bfloat16_logits():
    model, (x, y) = _deterministic_model().to(torch.bfloat16), _data()
    pred = predict(model, _batches(x.bfloat16(), y, 16), num_samples=1)
    assert pred.mean_probs.dtype == torch.float32
    assert torch.allclose(pred.mean_probs.sum(-1), torch.ones(60), atol=1e-6)


def test_predict_rejects_batches_whose_order_changes_between_passes():
    model, (x, y) = _bayesian_model(), _data()

    class Reshuffling:  # a re-iterable that yields a different order on every pass
        passes = 0

        def __iter__(self):
            Reshuffling.passes += 1
            perm = torch.randperm(60, generator=torch.Generator().manual_seed(Reshuffling.passes))
            return iter(_batches(x[perm], y[perm], 16))

    with pytest.raises(ValueError, match="differ between passes"):
        predict(model, Reshuffling(), num_samples=2)


def test_reliability_diagram_data_counts_and_means_per_bin():
    from asbatch.evaluate import reliability_diagram_data

    # confidences 0.9 (correct), 0.95 (wrong), 0.5 (correct) with 2 bins: (0, .5] and (.5, 1]
    probs = torch.tensor([[0.9, 0.1], [0.05, 0.95], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 0])
    data = reliability_diagram_data(probs, labels, n_bins=2)
    assert data["count"] == [1, 2]
    assert data["confidence"] == pytest.approx([0.5, 0.925])
    assert data["accuracy"] == pytest.approx([1.0, 0.5])
    empty = reliability_diagram_data(probs, labels, n_bins=4)
    assert empty["count"] == [0, 1, 0, 2] and empty["accuracy"][0] is None

"""Evaluation metrics against values computed by hand on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.evaluate.metrics import (
    Counts,
    accuracy,
    auc_from_counts,
    average_precision,
    average_precision_from_counts,
    bias,
    bootstrap_interval,
    classification_metrics,
    confusion_matrix,
    counts_at_thresholds,
    dice,
    iou,
    mean_absolute_error,
    one_vs_rest_auc,
    pooled_statistic,
    quadratic_weighted_kappa,
    roc_auc,
    score_counts,
    segmentation_counts,
    segmentation_figures,
    segmentation_metrics,
    sensitivity,
    specificity,
    weighted_auc,
)

# A 3x4 example used by several tests.
#   prediction      truth           fov
#   1 1 0 0         1 0 0 0         1 1 1 1
#   1 0 0 1         1 1 0 0         1 1 1 1
#   0 0 0 1         0 0 0 0         1 1 1 0
# Inside the FOV (11 pixels; the bottom-right pixel is excluded):
#   TP: (0,0), (1,0)                      -> 2
#   FP: (0,1), (1,3)                      -> 2   ((2,3) is outside the FOV)
#   FN: (1,1)                             -> 1
#   TN: 11 - 2 - 2 - 1                    -> 6
PRED = np.array([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1]], dtype=bool)
TRUTH = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
FOV = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)


def test_segmentation_counts_inside_fov() -> None:
    assert segmentation_counts(PRED, TRUTH, FOV) == Counts(tp=2, fp=2, fn=1, tn=6)
    # Without a FOV the bottom-right pixel (pred 1, truth 0) is one more FP: 12 pixels.
    assert segmentation_counts(PRED, TRUTH) == Counts(tp=2, fp=3, fn=1, tn=6)


def test_segmentation_figures_by_hand() -> None:
    # Dice = 2*2 / (2*2 + 2 + 1) = 4/7; IoU = 2 / (2 + 2 + 1) = 2/5;
    # sensitivity = 2 / (2 + 1) = 2/3; specificity = 6 / (6 + 2) = 3/4;
    # accuracy = (2 + 6) / 11 = 8/11.
    figures = segmentation_metrics(PRED, TRUTH, FOV)
    assert figures["dice"] == pytest.approx(4 / 7)
    assert figures["iou"] == pytest.approx(2 / 5)
    assert figures["sensitivity"] == pytest.approx(2 / 3)
    assert figures["specificity"] == pytest.approx(3 / 4)
    assert figures["accuracy"] == pytest.approx(8 / 11)


def test_counts_pool_by_addition() -> None:
    # Two images: (tp2 fp2 fn1 tn6) + (tp1 fp0 fn3 tn4) = (tp3 fp2 fn4 tn10).
    # Pooled Dice = 6 / (6 + 2 + 4) = 1/2 (not the mean of per-image Dice 4/7 and 2/5).
    pooled = Counts(2, 2, 1, 6) + Counts(1, 0, 3, 4)
    assert pooled == Counts(3, 2, 4, 10)
    assert dice(pooled) == pytest.approx(0.5)
    assert segmentation_figures(pooled)["iou"] == pytest.approx(3 / 9)


def test_integer_masks_are_accepted_and_non_binary_rejected() -> None:
    assert segmentation_counts(PRED.astype(np.uint8), TRUTH.astype(int), FOV) == Counts(2, 2, 1, 6)
    with pytest.raises(ValueError, match="binary"):
        segmentation_counts(PRED.astype(int) * 2, TRUTH)
    with pytest.raises(ValueError, match="shape"):
        segmentation_counts(PRED, TRUTH[:2])


def test_degenerate_segmentation_gives_nan() -> None:
    # Nothing to find and nothing found: Dice 0/0, IoU 0/0, sensitivity 0/0 are undefined
    # (NaN); specificity 4/4 = 1 and accuracy 4/4 = 1 are defined.
    empty = np.zeros((2, 2), dtype=bool)
    counts = segmentation_counts(empty, empty)
    assert counts == Counts(0, 0, 0, 4)
    assert math.isnan(dice(counts))
    assert math.isnan(iou(counts))
    assert math.isnan(sensitivity(counts))
    assert specificity(counts) == 1.0
    assert accuracy(counts) == 1.0
    # All truth positive: specificity has no negatives -> NaN.
    full = np.ones((2, 2), dtype=bool)
    assert math.isnan(specificity(segmentation_counts(full, full)))
    # An empty FOV: nothing counts, every ratio is NaN.
    assert math.isnan(accuracy(segmentation_counts(full, full, empty)))
    # A prediction that finds nothing where truth has vessels: Dice 0 (defined), not NaN.
    assert dice(segmentation_counts(empty, full)) == 0.0


def test_auc_without_ties() -> None:
    # Positives score 0.8, 0.4; negatives 0.6, 0.2, 0.1. Pairs (pos > neg):
    # 0.8 beats all 3; 0.4 beats 0.2 and 0.1 (2 of 3) -> 5 wins of 2*3 = 6 -> AUC 5/6.
    scores = [0.8, 0.6, 0.4, 0.2, 0.1]
    labels = [1, 0, 1, 0, 0]
    assert roc_auc(scores, labels) == pytest.approx(5 / 6)


def test_auc_with_ties_counts_one_half() -> None:
    # Positives 0.5, 0.5, 0.9; negatives 0.5, 0.1.
    # 0.9 beats both negatives: 2. Each 0.5 positive ties 0.5 negative (1/2) and beats 0.1
    # (1): 1.5 each -> 3. Total 5 of 3*2 = 6 -> AUC 5/6.
    scores = np.array([0.5, 0.5, 0.9, 0.5, 0.1])
    labels = np.array([1, 1, 1, 0, 0])
    assert roc_auc(scores, labels) == pytest.approx(5 / 6)
    # Everything tied: every pair counts 1/2 -> AUC 1/2.
    assert roc_auc([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(0.5)


def test_auc_extremes_and_shape() -> None:
    # Perfect ranking -> 1; reversed -> 0. Works on 2-D arrays (pixels).
    assert roc_auc([[0.9, 0.8], [0.2, 0.1]], [[1, 1], [0, 0]]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0


def test_auc_degenerate_is_nan_or_error() -> None:
    # Only one class: AUC undefined -> NaN (documented).
    assert math.isnan(roc_auc([0.1, 0.9], [0, 0]))
    assert math.isnan(roc_auc([0.1, 0.9], [1, 1]))
    with pytest.raises(ValueError):
        roc_auc([], [])
    with pytest.raises(ValueError):
        roc_auc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2, 0.3], [0, 1])


def test_auc_matches_pair_counting_on_random_data() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=60) / 5.0  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(scores, labels) == pytest.approx(wins / (pos.size * neg.size))


def test_counts_at_thresholds() -> None:
    # Scores 0.8(+) 0.6(-) 0.4(+) 0.2(-); score >= t is positive.
    # t = 0.5: predicted {0.8, 0.6} -> TP 1, FP 1, FN 1, TN 1.
    # t = 0.4: predicted {0.8, 0.6, 0.4} -> TP 2, FP 1, FN 0, TN 1 (>= includes 0.4).
    # t = 0.9: nothing predicted -> TP 0, FP 0, FN 2, TN 2.
    got = counts_at_thresholds([0.8, 0.6, 0.4, 0.2], [1, 0, 1, 0], [0.5, 0.4, 0.9])
    assert got == [Counts(1, 1, 1, 1), Counts(2, 1, 0, 1), Counts(0, 0, 2, 2)]


def test_confusion_matrix_layout() -> None:
    # truth:     1 1 1 0 0
    # predicted: 1 0 1 1 0  -> TP 2, FN 1, FP 1, TN 1 -> [[TN, FP], [FN, TP]] = [[1,1],[1,2]]
    matrix = confusion_matrix([1, 0, 1, 1, 0], [1, 1, 1, 0, 0])
    assert matrix.tolist() == [[1, 1], [1, 2]]


def test_classification_metrics_by_hand() -> None:
    # Scores 0.9(+) 0.7(-) 0.6(+) 0.3(+) 0.2(-), threshold 0.5 (score >= 0.5 positive):
    # predicted 1 1 1 0 0 -> TP 2 (0.9, 0.6), FP 1 (0.7), FN 1 (0.3), TN 1 (0.2).
    # sensitivity 2/3, specificity 1/2, accuracy 3/5.
    # AUC: 0.9 beats both negatives (2); 0.6 beats 0.2 (1); 0.3 beats 0.2 (1) -> 4 of 6.
    result = classification_metrics([0.9, 0.7, 0.6, 0.3, 0.2], [1, 0, 1, 1, 0], 0.5)
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == pytest.approx(1 / 2)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["auc"] == pytest.approx(4 / 6)
    assert result["confusion_matrix"] == [[1, 1], [1, 2]]
    assert result["threshold"] == 0.5


def test_classification_without_positives() -> None:
    # No positive label: AUC and sensitivity undefined (NaN), specificity 1/2.
    result = classification_metrics([0.9, 0.1], [0, 0], 0.5)
    assert math.isnan(float(result["auc"]))  # type: ignore[arg-type]
    assert math.isnan(float(result["sensitivity"]))  # type: ignore[arg-type]
    assert result["specificity"] == pytest.approx(0.5)


def test_measurement_mae_and_bias() -> None:
    # predicted - truth = (12-10, 18-20, 33-30) = (2, -2, 3)
    # MAE = (2 + 2 + 3) / 3 = 7/3; bias = (2 - 2 + 3) / 3 = 1.
    predicted = [12.0, 18.0, 33.0]
    truth = [10.0, 20.0, 30.0]
    assert mean_absolute_error(predicted, truth) == pytest.approx(7 / 3)
    assert bias(predicted, truth) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_absolute_error([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        bias([], [])


def test_average_precision_is_step_wise() -> None:
    # Descending: 0.9(+) P 1/1 at R 1/3; 0.8(-); 0.7(+) P 2/3 at R 2/3; 0.6(-); 0.5(+) P 3/5 at
    # R 1. AP = 1/3 * (1 + 2/3 + 3/5) = 34/45 (trapezoids would give another number).
    assert average_precision([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1]) == pytest.approx(34 / 45)
    # Tied scores enter as one step: 0.8 holds one + and one - (P 1/2, recall +1/2), then 0.3(+)
    # (P 2/3, recall +1/2): AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12.
    assert average_precision([0.8, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == pytest.approx(7 / 12)
    assert average_precision([[0.9, 0.1]], [[1, 0]]) == 1.0  # perfect ranking, any shape
    assert math.isnan(average_precision([0.2, 0.4], [0, 0]))  # no positive: undefined


def test_quadratic_weighted_kappa_by_hand() -> None:
    # truth 0 1 2 2, predicted 0 2 2 1, K = 3, w_ij = (i-j)^2 / 4.
    # Observed off-diagonal: (1,2) and (2,1), w 1/4 each: sum wO = 1/2.
    # Marginals truth [1,1,2], predicted [1,1,2]; E_ij = r_i c_j / 4:
    # sum wE = 2 * (1/4 * 1/4) + 2 * (1 * 2/4) + 2 * (1/4 * 2/4) = 1/8 + 1 + 1/4 = 11/8.
    # kappa = 1 - (1/2) / (11/8) = 7/11.
    assert quadratic_weighted_kappa([0, 2, 2, 1], [0, 1, 2, 2], 3) == pytest.approx(7 / 11)
    assert quadratic_weighted_kappa([0, 1, 2], [0, 1, 2], 3) == 1.0
    # Two classes: Cohen's kappa. truth 1 1 0 0, predicted 1 0 0 0: po 3/4, pe 1/2 -> 1/2.
    assert quadratic_weighted_kappa([1, 0, 0, 0], [1, 1, 0, 0], 2) == pytest.approx(0.5)
    # Truth and predictions all one class: no expected disagreement, undefined.
    assert math.isnan(quadratic_weighted_kappa([0, 0], [0, 0], 3))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        quadratic_weighted_kappa([3], [0], 3)


def test_one_vs_rest_auc_by_hand() -> None:
    # truth 0 1 2 1. Class 0: its one positive (0.7) outscores 0.2, 0.1, 0.3 -> 1.
    # Class 1: positives 0.5, 0.3; negatives 0.2, 0.3: 0.5 beats both (2), 0.3 beats 0.2 and
    # ties 0.3 (1.5) -> 3.5 / 4. Class 2: 0.6 beats 0.1, 0.3, 0.4 -> 1.
    probs = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.3, 0.4]]
    assert one_vs_rest_auc(probs, [0, 1, 2, 1]) == pytest.approx([1.0, 7 / 8, 1.0])
    got = one_vs_rest_auc(probs, [0, 1, 1, 1])  # class 2 absent from the truth: NaN
    assert math.isnan(got[2])


def test_pooled_counts_resample_whole_images() -> None:
    # Image A: 0.9(+) 0.1(-); image B: 0.4(+) 0.6(-). Pooled: 0.9 beats 0.1 and 0.6 (2), 0.4
    # beats 0.1 (1) -> AUC 3/4. Drawing A twice is A alone (AUC 1); B alone (AUC 0).
    table = score_counts([[0.9, 0.1], [0.4, 0.6]], [[1, 0], [1, 0]])
    assert table.exact
    auc = pooled_statistic(table, auc_from_counts)
    assert auc(np.array([1.0, 1.0])) == pytest.approx(0.75)
    assert auc(np.array([2.0, 0.0])) == 1.0
    assert auc(np.array([0.0, 1.0])) == 0.0
    # AP pooled: 0.9(+) P 1 R 1/2; 0.6(-); 0.4(+) P 2/3 R 1 -> 1/2 + 1/3 = 5/6.
    ap = pooled_statistic(table, average_precision_from_counts)
    assert ap(np.array([1.0, 1.0])) == pytest.approx(5 / 6)
    # More distinct scores than levels: equal bins between the lowest and the highest score.
    binned = score_counts([[0.0, 0.2, 0.9, 1.0]], [[0, 1, 0, 1]], max_levels=2)
    assert not binned.exact
    assert binned.positives.tolist() == [[1.0, 1.0]]  # 0.2 in [0, 0.5), 1.0 in [0.5, 1]


def test_weighted_auc_counts_draws() -> None:
    # Scores 0.9(+) 0.4(+) 0.6(-) 0.1(-): all once -> 3/4 (as roc_auc); without 0.6 -> 1;
    # 0.4 twice against 0.6 once -> 0.
    auc = weighted_auc([0.9, 0.4, 0.6, 0.1], [1, 1, 0, 0])
    assert auc(np.ones(4)) == pytest.approx(roc_auc([0.9, 0.4, 0.6, 0.1], [1, 1, 0, 0]))
    assert auc(np.array([1.0, 1.0, 0.0, 1.0])) == 1.0
    assert auc(np.array([0.0, 2.0, 1.0, 0.0])) == 0.0


def test_bootstrap_interval_by_hand() -> None:
    # One group: every resample draws it, the interval is the value itself.
    assert bootstrap_interval(1, lambda w: 0.3, resamples=50) == (0.3, 0.3, 50)
    # Two groups, statistic = share of draws that are group 0: 0, 1/2 or 1 with probability
    # 1/4, 1/2, 1/4; the 2.5 % and 97.5 % points of 1000 resamples are 0 and 1.
    low, high, used = bootstrap_interval(2, lambda w: float(w[0]) / 2.0)
    assert (low, high, used) == (0.0, 1.0, 1000)
    # Reproducible (fixed seed), and resamples where the statistic is undefined are dropped.
    def share(w: np.ndarray) -> float:
        return math.nan if w[0] == 0 else float(w[0]) / 3.0
    first = bootstrap_interval(3, share, resamples=200)
    assert first == bootstrap_interval(3, share, resamples=200)
    # P(group 0 never drawn in 3) = (2/3)^3 = 8/27: about 141 of 200 kept.
    assert 110 < first[2] < 170
    assert math.isnan(bootstrap_interval(2, lambda w: math.nan, resamples=5)[0])

"""Evaluation metrics against values computed by hand on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicomnode.evaluate.metrics import (
    Counts,
    accuracy,
    bias,
    classification_metrics,
    confusion_matrix,
    counts_at_thresholds,
    dice,
    iou,
    mean_absolute_error,
    roc_auc,
    segmentation_counts,
    segmentation_figures,
    segmentation_metrics,
    sensitivity,
    specificity,
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

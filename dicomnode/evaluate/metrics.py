"""Model-efficacy metrics, pure numpy.

Segmentation (binary masks, optionally restricted to a field-of-view mask): Dice, IoU,
sensitivity, specificity, accuracy, and pixel-level ROC AUC. Classification: ROC AUC,
sensitivity and specificity at a threshold, confusion matrix. Measurement: mean absolute
error and bias.

Conventions
-----------
* Positive = vessel / disease / label 1. A score counts as positive when ``score >= threshold``.
* Counts are kept as a :class:`Counts` (tp, fp, fn, tn) so that several images can be pooled
  by adding their counts (``sum(counts_list, Counts())``) before taking a ratio.
* **Undefined ratios return NaN, never raise.** A ratio whose denominator is zero is undefined
  (e.g. sensitivity with no positives in the truth, Dice when neither truth nor prediction has
  a positive pixel, AUC when the truth holds only one class): the function returns
  ``float("nan")``. Callers that want an error test with ``math.isnan``. Shape mismatches and
  empty inputs are errors (``ValueError``).
* ROC AUC is exact: it is the Mann-Whitney statistic computed from ranks, with tied scores
  counted as one half (equivalent to the trapezoidal area under the ROC curve that joins tied
  points by a straight segment). It groups equal scores with ``np.unique``, so memory is a few
  arrays of the input's length (fine for ~10 million pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Counts",
    "accuracy",
    "bias",
    "classification_metrics",
    "confusion_matrix",
    "counts_at_thresholds",
    "dice",
    "iou",
    "mean_absolute_error",
    "roc_auc",
    "segmentation_counts",
    "segmentation_figures",
    "segmentation_metrics",
    "sensitivity",
    "specificity",
]


@dataclass(frozen=True)
class Counts:
    """Confusion counts of a binary decision."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else math.nan


def _as_bool(values: ArrayLike, name: str) -> NDArray[np.bool_]:
    array = np.asarray(values)
    if array.dtype == np.bool_:
        return array
    if not np.all((array == 0) | (array == 1)):
        raise ValueError(f"{name} must be binary (0/1 or bool)")
    return array.astype(np.bool_)


def segmentation_counts(
    prediction: ArrayLike, truth: ArrayLike, fov: ArrayLike | None = None
) -> Counts:
    """Confusion counts of a binary prediction against a binary truth, inside `fov`.

    All three arrays have the same shape; `fov` (bool) selects the pixels that count (all of
    them when None).
    """
    pred = _as_bool(prediction, "prediction")
    true = _as_bool(truth, "truth")
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} differ in shape")
    if fov is not None:
        inside = _as_bool(fov, "fov")
        if inside.shape != pred.shape:
            raise ValueError(f"fov {inside.shape} and prediction {pred.shape} differ in shape")
        pred = pred[inside]
        true = true[inside]
    tp = int(np.count_nonzero(pred & true))
    fp = int(np.count_nonzero(pred & ~true))
    fn = int(np.count_nonzero(~pred & true))
    tn = int(pred.size - tp - fp - fn)
    return Counts(tp, fp, fn, tn)


def dice(counts: Counts) -> float:
    """2 TP / (2 TP + FP + FN); NaN when truth and prediction are both empty."""
    return _ratio(2 * counts.tp, 2 * counts.tp + counts.fp + counts.fn)


def iou(counts: Counts) -> float:
    """Jaccard index TP / (TP + FP + FN); NaN when truth and prediction are both empty."""
    return _ratio(counts.tp, counts.tp + counts.fp + counts.fn)


def sensitivity(counts: Counts) -> float:
    """TP / (TP + FN) (recall, true-positive rate); NaN when the truth has no positive."""
    return _ratio(counts.tp, counts.tp + counts.fn)


def specificity(counts: Counts) -> float:
    """TN / (TN + FP) (true-negative rate); NaN when the truth has no negative."""
    return _ratio(counts.tn, counts.tn + counts.fp)


def accuracy(counts: Counts) -> float:
    """(TP + TN) / all; NaN when there is nothing to count."""
    return _ratio(counts.tp + counts.tn, counts.total)


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact area under the ROC curve (probability that a random positive outscores a random
    negative, ties counting one half). NaN when `labels` holds only one class.

    `scores` are real numbers (any shape), `labels` binary of the same shape.
    """
    score = np.asarray(scores, dtype=np.float64).ravel()
    label = _as_bool(labels, "labels").ravel()
    if score.shape != label.shape:
        raise ValueError(f"scores {score.shape} and labels {label.shape} differ in size")
    if score.size == 0:
        raise ValueError("no scores")
    if np.isnan(score).any():
        raise ValueError("scores contain NaN")
    positives = int(np.count_nonzero(label))
    negatives = int(label.size - positives)
    if positives == 0 or negatives == 0:
        return math.nan
    # Group equal scores (ascending); per group count positives and negatives.
    _, inverse, group_size = np.unique(score, return_inverse=True, return_counts=True)
    pos_in_group = np.bincount(inverse.ravel(), weights=label, minlength=group_size.size)
    neg_in_group = group_size - pos_in_group
    # Negatives strictly below each group.
    neg_below = np.cumsum(neg_in_group) - neg_in_group
    wins = float(np.sum(pos_in_group * neg_below) + 0.5 * np.sum(pos_in_group * neg_in_group))
    return wins / (float(positives) * float(negatives))


def counts_at_thresholds(
    scores: ArrayLike, labels: ArrayLike, thresholds: Sequence[float] | NDArray[np.floating]
) -> list[Counts]:
    """Confusion counts of ``score >= t`` for every threshold `t` (one pass, sorted search)."""
    score = np.asarray(scores, dtype=np.float64).ravel()
    label = _as_bool(labels, "labels").ravel()
    if score.shape != label.shape:
        raise ValueError(f"scores {score.shape} and labels {label.shape} differ in size")
    pos = np.sort(score[label])
    neg = np.sort(score[~label])
    cuts = np.asarray(thresholds, dtype=np.float64)
    # Number of values >= t is size - (number of values < t).
    tp = pos.size - np.searchsorted(pos, cuts, side="left")
    fp = neg.size - np.searchsorted(neg, cuts, side="left")
    return [
        Counts(int(a), int(b), int(pos.size - a), int(neg.size - b))
        for a, b in zip(tp, fp, strict=True)
    ]


def segmentation_metrics(
    prediction: ArrayLike, truth: ArrayLike, fov: ArrayLike | None = None
) -> dict[str, float]:
    """Dice, IoU, sensitivity, specificity and accuracy of one binary mask inside `fov`."""
    return segmentation_figures(segmentation_counts(prediction, truth, fov))


def segmentation_figures(counts: Counts) -> dict[str, float]:
    """Dice, IoU, sensitivity, specificity and accuracy of `counts` (pool counts first)."""
    return {
        "dice": dice(counts),
        "iou": iou(counts),
        "sensitivity": sensitivity(counts),
        "specificity": specificity(counts),
        "accuracy": accuracy(counts),
    }


def confusion_matrix(predicted: ArrayLike, truth: ArrayLike) -> NDArray[np.int64]:
    """2x2 confusion matrix ``[[TN, FP], [FN, TP]]`` (rows: truth 0/1, columns: predicted 0/1)."""
    counts = segmentation_counts(predicted, truth)
    return np.array([[counts.tn, counts.fp], [counts.fn, counts.tp]], dtype=np.int64)


def classification_metrics(
    scores: ArrayLike, labels: ArrayLike, threshold: float
) -> dict[str, object]:
    """AUC, sensitivity and specificity at `threshold` (``score >= threshold`` is positive)
    and the confusion matrix as nested lists."""
    score = np.asarray(scores, dtype=np.float64)
    label = _as_bool(labels, "labels")
    predicted = score >= threshold
    counts = segmentation_counts(predicted, label)
    return {
        "auc": roc_auc(score, label),
        "sensitivity": sensitivity(counts),
        "specificity": specificity(counts),
        "accuracy": accuracy(counts),
        "confusion_matrix": confusion_matrix(predicted, label).tolist(),
        "threshold": float(threshold),
    }


def _paired(predicted: ArrayLike, truth: ArrayLike) -> tuple[NDArray[np.float64], ...]:
    pred = np.asarray(predicted, dtype=np.float64).ravel()
    true = np.asarray(truth, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"predicted {pred.shape} and truth {true.shape} differ in size")
    if pred.size == 0:
        raise ValueError("no values")
    return pred, true


def mean_absolute_error(predicted: ArrayLike, truth: ArrayLike) -> float:
    """mean(|predicted - truth|)."""
    pred, true = _paired(predicted, truth)
    return float(np.mean(np.abs(pred - true)))


def bias(predicted: ArrayLike, truth: ArrayLike) -> float:
    """mean(predicted - truth): positive when the measurement overestimates."""
    pred, true = _paired(predicted, truth)
    return float(np.mean(pred - true))

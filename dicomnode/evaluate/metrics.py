"""Model-efficacy metrics, pure numpy.

Segmentation (binary masks, optionally restricted to a field-of-view mask): Dice, IoU,
sensitivity, specificity, accuracy, pixel-level ROC AUC and average precision (area under the
precision-recall curve). Classification: ROC AUC (one-vs-rest per class), sensitivity and
specificity at a threshold, confusion matrix, quadratic-weighted kappa. Measurement: mean
absolute error and bias. Bootstrap confidence intervals resample whole images.

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
* Average precision is exact and step-wise (no trapezoids): with the distinct scores taken from
  the highest down, AP = sum_k (R_k - R_{k-1}) * P_k, where R_k and P_k are recall and
  precision of ``score >= s_k``. Tied scores enter together, as one step. NaN without positives.
* Quadratic-weighted kappa over K ordered classes: 1 - sum(w O) / sum(w E), with
  w_ij = (i - j)^2 / (K - 1)^2, O the observed confusion counts and E the counts expected from
  the two marginals. NaN when sum(w E) is 0 (e.g. the truth holds one class and so do the
  predictions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Counts",
    "ScoreCounts",
    "accuracy",
    "auc_from_counts",
    "average_precision",
    "average_precision_from_counts",
    "bias",
    "bootstrap_interval",
    "classification_metrics",
    "confusion_matrix",
    "counts_at_thresholds",
    "dice",
    "iou",
    "mean_absolute_error",
    "one_vs_rest_auc",
    "pooled_statistic",
    "quadratic_weighted_kappa",
    "roc_auc",
    "score_counts",
    "segmentation_counts",
    "segmentation_figures",
    "segmentation_metrics",
    "sensitivity",
    "specificity",
    "weighted_auc",
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
    score, label = _scores_and_labels(scores, labels)
    # Group equal scores (ascending); per group count positives and negatives.
    _, inverse, group_size = np.unique(score, return_inverse=True, return_counts=True)
    pos_in_group = np.bincount(inverse.ravel(), weights=label, minlength=group_size.size)
    return auc_from_counts(pos_in_group, group_size - pos_in_group)


def _scores_and_labels(scores: ArrayLike,
                       labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    score = np.asarray(scores, dtype=np.float64).ravel()
    label = _as_bool(labels, "labels").ravel()
    if score.shape != label.shape:
        raise ValueError(f"scores {score.shape} and labels {label.shape} differ in size")
    if score.size == 0:
        raise ValueError("no scores")
    if np.isnan(score).any():
        raise ValueError("scores contain NaN")
    return score, label


def auc_from_counts(positives: ArrayLike, negatives: ArrayLike) -> float:
    """ROC AUC from positive and negative counts per distinct score, scores ascending.

    Counts may be weights (a bootstrap resample counts an image as often as it was drawn).
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    total_pos, total_neg = float(pos.sum()), float(neg.sum())
    if total_pos <= 0 or total_neg <= 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg  # negatives strictly below each score
    wins = float(np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg))
    return wins / (total_pos * total_neg)


def average_precision_from_counts(positives: ArrayLike, negatives: ArrayLike) -> float:
    """Step-wise average precision from counts per distinct score, scores ascending."""
    pos = np.asarray(positives, dtype=np.float64)[::-1]  # highest score first
    neg = np.asarray(negatives, dtype=np.float64)[::-1]
    total_pos = float(pos.sum())
    if total_pos <= 0:
        return math.nan
    tp = np.cumsum(pos)
    predicted = tp + np.cumsum(neg)
    steps = pos > 0  # recall grows only where positives enter; other steps add 0
    precision = tp[steps] / predicted[steps]
    return float(np.sum(pos[steps] / total_pos * precision))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact, step-wise area under the precision-recall curve (see the module notes)."""
    score, label = _scores_and_labels(scores, labels)
    _, inverse, group_size = np.unique(score, return_inverse=True, return_counts=True)
    pos_in_group = np.bincount(inverse.ravel(), weights=label, minlength=group_size.size)
    return average_precision_from_counts(pos_in_group, group_size - pos_in_group)


@dataclass(frozen=True)
class ScoreCounts:
    """Positive and negative counts per (group, score level): the groups are images.

    `levels` are ascending scores (exact distinct scores, or bin floors when `exact` is False).
    """

    levels: NDArray[np.float64]
    positives: NDArray[np.float64]  # (groups, levels)
    negatives: NDArray[np.float64]
    exact: bool


def score_counts(scores: Sequence[ArrayLike], labels: Sequence[ArrayLike],
                 max_levels: int = 65536) -> ScoreCounts:
    """Per-group count tables for bootstrap resampling of whole groups (images).

    The distinct scores of all groups are the levels when there are at most `max_levels` of
    them (exact); otherwise scores are put into `max_levels` equal bins between the lowest and
    the highest score (an approximation only for the interval, never for point estimates).
    """
    if len(scores) != len(labels) or not scores:
        raise ValueError("one score array and one label array per group, at least one group")
    pairs = [_scores_and_labels(s, lab) for s, lab in zip(scores, labels, strict=True)]
    every = np.concatenate([p[0] for p in pairs])
    levels = np.unique(every)
    exact = levels.size <= max_levels
    if not exact:
        low, high = float(levels[0]), float(levels[-1])
        levels = low + (high - low) * np.arange(max_levels, dtype=np.float64) / max_levels
    pos = np.zeros((len(pairs), levels.size), dtype=np.float64)
    neg = np.zeros_like(pos)
    for row, (score, label) in enumerate(pairs):
        if exact:
            index = np.searchsorted(levels, score)
        else:
            index = np.clip(np.searchsorted(levels, score, side="right") - 1, 0, levels.size - 1)
        pos[row] = np.bincount(index[label], minlength=levels.size)
        neg[row] = np.bincount(index[~label], minlength=levels.size)
    return ScoreCounts(levels, pos, neg, exact)


def bootstrap_interval(
    groups: int, statistic: Callable[[NDArray[np.float64]], float],
    *, resamples: int = 1000, seed: int = 0, level: float = 0.95,
) -> tuple[float, float, int]:
    """Percentile bootstrap interval over resamples of whole groups (images).

    Each resample draws `groups` groups with replacement (a fixed `seed`, so the interval is
    reproducible); `statistic` gets how often each group was drawn. Resamples where the
    statistic is undefined (one class only) are dropped. Returns (low, high, resamples used),
    NaN bounds when none is left.
    """
    if groups < 1:
        raise ValueError("no groups to resample")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, groups, size=groups), minlength=groups)
        value = statistic(weights.astype(np.float64))
        if math.isfinite(value):
            values.append(value)
    if not values:
        return math.nan, math.nan, 0
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(np.asarray(values), [tail, 100.0 - tail])
    return float(low), float(high), len(values)


def pooled_statistic(
    counts: ScoreCounts, statistic: Callable[[NDArray[np.float64], NDArray[np.float64]], float]
) -> Callable[[NDArray[np.float64]], float]:
    """`statistic` (auc_from_counts, average_precision_from_counts) of the groups' counts
    pooled with the resample's weights: for `bootstrap_interval` over images of pixels."""
    def pooled(weights: NDArray[np.float64]) -> float:
        return statistic(weights @ counts.positives, weights @ counts.negatives)
    return pooled


def weighted_auc(scores: ArrayLike, labels: ArrayLike) -> Callable[[NDArray[np.float64]], float]:
    """ROC AUC of one score per group with the resample's weights: for `bootstrap_interval`
    over images of a classifier."""
    score, label = _scores_and_labels(scores, labels)
    _, inverse = np.unique(score, return_inverse=True)
    inverse = inverse.ravel()
    size = int(inverse.max()) + 1

    def weighted(weights: NDArray[np.float64]) -> float:
        pos = np.bincount(inverse, weights=weights * label, minlength=size)
        neg = np.bincount(inverse, weights=weights * ~label, minlength=size)
        return auc_from_counts(pos, neg)
    return weighted


def one_vs_rest_auc(probabilities: ArrayLike, truth: ArrayLike) -> list[float]:
    """ROC AUC of each class's probability against "truth is that class" (NaN when a class is
    absent from the truth, or is all of it). `probabilities` is (N, K), `truth` N class indices."""
    probs = np.asarray(probabilities, dtype=np.float64)
    true = np.asarray(truth, dtype=np.int64).ravel()
    if probs.ndim != 2 or probs.shape[0] != true.size:
        raise ValueError(f"probabilities {probs.shape} do not match {true.size} truth labels")
    return [roc_auc(probs[:, k], true == k) for k in range(probs.shape[1])]


def quadratic_weighted_kappa(predicted: ArrayLike, truth: ArrayLike, classes: int) -> float:
    """Quadratic-weighted Cohen's kappa of class indices 0..classes-1 (see the module notes)."""
    pred = np.asarray(predicted, dtype=np.int64).ravel()
    true = np.asarray(truth, dtype=np.int64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"predicted {pred.shape} and truth {true.shape} differ in size")
    if pred.size == 0:
        raise ValueError("no values")
    if classes < 2:
        raise ValueError("kappa needs at least two classes")
    if pred.min() < 0 or true.min() < 0 or pred.max() >= classes or true.max() >= classes:
        raise ValueError(f"class indices must be 0..{classes - 1}")
    observed = np.zeros((classes, classes), dtype=np.float64)
    np.add.at(observed, (true, pred), 1.0)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / pred.size
    i, j = np.indices((classes, classes))
    weights = (i - j) ** 2 / float((classes - 1) ** 2)
    disagreement = float(np.sum(weights * expected))
    if disagreement == 0.0:
        return math.nan
    return 1.0 - float(np.sum(weights * observed)) / disagreement


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

"""Measure one model on a dataset, running it the node's way.

Each image goes through the real executor (`GraphExecutor`) on the graph that model needs
(its `requires` and `from:` upstream models included), so pre-processing (field-of-view crop,
resize, normalisation) and post-processing (masks mapped back onto the source frame,
thresholds, class decisions) are exactly what the node does. An image a gate upstream stops is
reported as skipped and left out of the figures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dicomnode.evaluate.dataset import Dataset, DatasetError, Row, load_mask, load_rgb
from dicomnode.evaluate.metrics import (
    Counts,
    accuracy,
    auc_from_counts,
    average_precision,
    average_precision_from_counts,
    bias,
    bootstrap_interval,
    mean_absolute_error,
    one_vs_rest_auc,
    pooled_statistic,
    quadratic_weighted_kappa,
    roc_auc,
    score_counts,
    segmentation_counts,
    segmentation_figures,
    sensitivity,
    specificity,
    weighted_auc,
)
from dicomnode.graph import Selection, resolve
from dicomnode.inference.executor import GraphExecutor, ModelResult
from dicomnode.inference.fov import find_field_of_view
from dicomnode.inference.postprocess import classify, mask_to_source, measured_values
from dicomnode.inference.preprocess import SourceImage
from dicomnode.inference.sessions import SessionPool
from dicomnode.registry.manifest import (
    MaskOutput,
    MeasurementOutput,
    ProbabilitiesOutput,
)
from dicomnode.registry.registry import ModelEntry, Registry

logger = logging.getLogger(__name__)

_YES = {"1", "yes", "true", "positive"}
_NO = {"0", "no", "false", "negative"}

# 95 % percentile bootstrap over images, reproducible (docs/results.md, "Evaluation").
RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


@dataclass
class Evaluation:
    model: str
    version: str
    dataset: str
    kind: str
    output: str
    figures: dict[str, Any]
    images: int
    skipped: dict[str, str] = field(default_factory=dict)  # image path -> reason
    # every model of the graph that ran, id -> version: a measurement depends on its sources
    graph: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": self.version, "dataset": self.dataset,
            "task": self.kind, "output": self.output, "images": self.images,
            "skipped": self.skipped, "graph": self.graph, **self.figures,
        }

    def flat_figures(self) -> dict[str, Any]:
        """The figures as a manifest's `metrics[].figures` holds them: an interval stays
        `auc_ci: [a, b]` (the console shows it beside `auc`); per-class values are spread into
        plain keys, `auc_per_class` {mild: x} -> `auc_per_class.mild`. The bootstrap's
        settings are how, not what, and stay out."""
        out: dict[str, Any] = {}
        for key, value in self.figures.items():
            if key == "bootstrap":
                continue
            if isinstance(value, dict):
                out.update({f"{key}.{name}": item for name, item in value.items()})
            else:
                out[key] = value
        return out


class ModelRunner:
    """Runs one model (and what it needs) on one image at a time."""

    def __init__(self, registry: Registry, entry: ModelEntry, providers: list[str],
                 with_models: Sequence[str] = ()) -> None:
        self.entry = entry
        key = f"{entry.manifest.id}@{entry.manifest.version}"
        # `with_models` join the graph, so an input with alternatives takes from them (e.g.
        # vessel-metrics fed by vessel-seg-classic instead of the default vessel-seg).
        selection = Selection.of([key, *with_models], modality=entry.manifest.modalities[0])
        self.graph = resolve(selection, registry)
        self.executor = GraphExecutor(registry, SessionPool(providers), model_threads=1)

    def run(self, rgb: NDArray[np.uint8], uid: str) -> tuple[ModelResult, str | None]:
        """The model's result for one image, and why it was skipped (None when it ran)."""
        result = self.executor.run(self.graph, [SourceImage(uid, rgb)])
        mine = result.models[self.entry.manifest.id]
        if mine.status == "failed":
            raise DatasetError(f"{self.entry.manifest.key} failed: {mine.error}")
        if uid in mine.skipped or mine.status == "skipped":
            return mine, mine.skipped.get(uid) or mine.error or "skipped"
        return mine, None


def _pick(entry: ModelEntry, kind: type, name: str | None) -> Any:
    outputs = [o for o in entry.manifest.outputs if isinstance(o, kind)]
    if name is not None:
        outputs = [o for o in outputs if o.name == name]
    if not outputs:
        wanted = f"'{name}'" if name else kind.__name__
        raise DatasetError(f"{entry.manifest.key} has no {wanted} output for this dataset")
    return outputs[0]


_OUTPUT_KIND: dict[str, type] = {
    "segmentation": MaskOutput,
    "classification": ProbabilitiesOutput,
    "measurement": MeasurementOutput,
}


def evaluate(dataset: Dataset, registry: Registry, entry: ModelEntry, *,
             output: str | None = None, providers: list[str] | None = None,
             with_models: Sequence[str] = (), mask_threshold: float | None = None) -> Evaluation:
    """Run the model on every row and measure `output` (the first output that fits when None).

    `mask_threshold`: truth / FOV mask pixels are inside at >= this value instead of >= half
    the mask's largest value (`load_mask`).
    """
    spec = _pick(entry, _OUTPUT_KIND[dataset.kind], output)
    runner = ModelRunner(registry, entry, providers or ["CPUExecutionProvider"], with_models)
    skipped: dict[str, str] = {}
    ran: list[tuple[Row, NDArray[np.uint8], ModelResult, str]] = []
    for index, row in enumerate(dataset.rows):
        uid = f"2.25.{index + 1}"
        rgb = load_rgb(row.image)
        result, reason = runner.run(rgb, uid)
        if reason is not None:
            skipped[str(row.image)] = reason
            continue
        ran.append((row, rgb, result, uid))
    if not ran:
        raise DatasetError(f"no image of {dataset.path} was run: {skipped}")
    if isinstance(spec, MaskOutput):
        figures = _segmentation(ran, spec, mask_threshold)
    elif isinstance(spec, ProbabilitiesOutput):
        figures = _classification(ran, spec)
    else:
        figures = _measurement(ran, spec)
    m = entry.manifest
    return Evaluation(m.id, m.version, dataset.name, dataset.kind, spec.name, figures,
                      len(ran), skipped, dict(runner.graph.models))


def _bootstrap(groups: int, statistic: Any) -> tuple[list[float], int]:
    low, high, used = bootstrap_interval(groups, statistic, resamples=RESAMPLES, seed=SEED,
                                         level=LEVEL)
    return [low, high], used


def _segmentation(ran: list[tuple[Row, NDArray[np.uint8], ModelResult, str]],
                  spec: MaskOutput, mask_threshold: float | None) -> dict[str, Any]:
    total = Counts()
    scores: list[NDArray[np.float32]] = []
    labels: list[NDArray[np.bool_]] = []
    for row, rgb, result, uid in ran:
        if row.truth is None:  # `none`: nothing of the kind in this image
            truth = np.zeros(rgb.shape[:2], dtype=np.bool_)
        else:
            truth = load_mask(row.truth, mask_threshold)
        fov = (load_mask(row.fov, mask_threshold) if row.fov is not None
               else find_field_of_view(rgb).mask)
        if truth.shape != rgb.shape[:2] or fov.shape != rgb.shape[:2]:
            raise DatasetError(f"line {row.line}: truth {truth.shape} / fov {fov.shape} do not "
                               f"match the image {rgb.shape[:2]}")
        probability = mask_to_source(result.raw[spec.name][uid], result.geometry[uid])
        total = total + segmentation_counts(probability >= np.float32(spec.threshold), truth, fov)
        scores.append(probability[fov])
        labels.append(truth[fov])
    figures: dict[str, Any] = dict(segmentation_figures(total))
    pooled_scores, pooled_labels = np.concatenate(scores), np.concatenate(labels)
    figures["auc"] = roc_auc(pooled_scores, pooled_labels)
    figures["aupr"] = average_precision(pooled_scores, pooled_labels)
    # Intervals resample images (pixels of one image are not independent).
    table = score_counts(scores, labels)
    figures["auc_ci"], used = _bootstrap(len(ran), pooled_statistic(table, auc_from_counts))
    figures["aupr_ci"], _ = _bootstrap(len(ran),
                                       pooled_statistic(table, average_precision_from_counts))
    figures["threshold"] = spec.threshold
    figures["pooling"] = "pixels inside the field of view of all images, at source resolution"
    figures["bootstrap"] = _bootstrap_note(used, "images", table.exact)
    return figures


def _bootstrap_note(used: int, unit: str, exact: bool = True) -> dict[str, Any]:
    note: dict[str, Any] = {"resamples": RESAMPLES, "used": used, "seed": SEED,
                            "level": LEVEL, "resampled": unit}
    if not exact:
        note["scores"] = "binned into 65536 levels for the interval only"
    return note


def _class_index(label: str, spec: ProbabilitiesOutput, line: int) -> int:
    """The truth's class index: a class label (any case); for two classes also 1/0, yes/no,
    true/false, positive/negative (the positive class and the other); for more, the index."""
    text = label.strip().lower()
    labels = [c.label.lower() for c in spec.classes]
    if text in labels:
        return labels.index(text)
    positive = labels.index(spec.positive_label.lower())
    if len(labels) == 2:
        if text in _YES:
            return positive
        if text in _NO:
            return 1 - positive
        raise DatasetError(f"line {line}: label '{label}' is not one of {labels} (or 1/0)")
    if text.isdigit() and int(text) < len(labels):
        return int(text)
    raise DatasetError(f"line {line}: label '{label}' is not one of {labels} "
                       f"(or a class index 0-{len(labels) - 1})")


def _classification(ran: list[tuple[Row, NDArray[np.uint8], ModelResult, str]],
                    spec: ProbabilitiesOutput) -> dict[str, Any]:
    labels = [c.label for c in spec.classes]
    positive = labels.index(spec.positive_label)
    probabilities, truth, decided = [], [], []
    for row, _rgb, result, uid in ran:
        assert row.label is not None
        values = np.asarray(result.raw[spec.name][uid], dtype=np.float64).reshape(-1)
        probabilities.append(values)
        truth.append(_class_index(row.label, spec, row.line))
        # the class the node reports: the threshold rule where the manifest has one, else argmax
        decided.append(labels.index(classify(values, spec).label))
    probs = np.vstack(probabilities)
    true, pred = np.asarray(truth), np.asarray(decided)
    counts = segmentation_counts(pred == positive, true == positive)
    figures: dict[str, Any] = {
        "auc": roc_auc(probs[:, positive], true == positive),
        "sensitivity": sensitivity(counts),
        "specificity": specificity(counts),
        "accuracy": float(np.mean(pred == true)),
        "kappa": quadratic_weighted_kappa(pred, true, len(labels)),
    }
    figures["auc_ci"], used = _bootstrap(len(ran), weighted_auc(probs[:, positive],
                                                                 true == positive))
    if len(labels) == 2:
        figures["confusion_matrix"] = [[counts.tn, counts.fp], [counts.fn, counts.tp]]
        figures["accuracy"] = accuracy(counts)
    else:
        matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
        np.add.at(matrix, (true, pred), 1)
        figures["confusion_matrix"] = matrix.tolist()  # rows truth, columns reported class
        figures["auc_per_class"] = dict(zip(labels, one_vs_rest_auc(probs, true), strict=True))
    figures["threshold"] = spec.threshold
    figures["decision"] = (f"p({spec.positive_label}) >= threshold" if spec.threshold is not None
                           else "most probable class")
    figures["positive"] = spec.positive_label
    figures["bootstrap"] = _bootstrap_note(used, "images")
    return figures


def _measurement(ran: list[tuple[Row, NDArray[np.uint8], ModelResult, str]],
                 spec: MeasurementOutput) -> dict[str, Any]:
    predicted, truth = [], []
    for row, _rgb, result, uid in ran:
        assert row.value is not None
        # The first reported value: the declared unit, or source pixels for a pixel measure.
        reported = measured_values(result.raw[spec.name][uid], spec, result.geometry.get(uid))
        predicted.append(reported[0].value)
        truth.append(row.value)
    return {"mae": mean_absolute_error(predicted, truth), "bias": bias(predicted, truth),
            "unit": spec.reported_unit.code}

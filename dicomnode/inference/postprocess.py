"""Post-processing: raw model outputs -> findings in source geometry.

- masks: resized back to the crop box and placed into the uncropped source frame; the
  probability map is kept beside the thresholded binary mask;
- probabilities: the labelled, coded class (threshold on the positive class, else argmax);
- measurements: one float, or for a `pixel_measure` the size rescaled from the model's input
  grid to source pixels, plus mm / mm2 where the image has Pixel Spacing;
- points and boxes: source pixel coordinates;
- gates: the reason an image is ineligible for the models that depend on this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dicomnode.inference.fov import place_back, resize_probability
from dicomnode.inference.preprocess import Geometry
from dicomnode.inference.reasons import NotAnalysedReason
from dicomnode.registry.manifest import (
    PHYSICAL_UNITS,
    PIXEL_UNITS,
    BoxOutput,
    MaskOutput,
    MeasurementOutput,
    PointOutput,
    ProbabilitiesOutput,
    UcumUnit,
)


@dataclass(frozen=True)
class Finding:
    """A classifier's answer for one image."""

    label: str
    code: dict[str, str]
    probability: float  # of the chosen label
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "code": self.code,
            "probability": self.probability,
            "probabilities": self.probabilities,
        }


def _mask_plane(values: NDArray[np.generic]) -> NDArray[np.float32]:
    """A model-space mask, [1, h, w] or [h, w] (any leading 1s), as its [h, w] plane."""
    plane = np.asarray(values, dtype=np.float32)
    while plane.ndim > 2:
        if plane.shape[0] != 1:
            raise ValueError(f"a mask has one channel, got shape {values.shape}")
        plane = plane[0]
    return plane


def mask_to_source(values: NDArray[np.generic], geometry: Geometry) -> NDArray[np.float32]:
    """A model-space mask ([1, h, w] or [h, w]) as a probability map over the source frame."""
    plane = _mask_plane(values)
    box = geometry.box
    crop = resize_probability(plane, box.height, box.width)
    placed = place_back(crop, box, geometry.source_shape)
    return np.asarray(placed, dtype=np.float32)


def binary_mask(probability: NDArray[np.float32], spec: MaskOutput) -> NDArray[np.bool_]:
    return probability >= np.float32(spec.threshold)


def binary_mask_to_source(values: NDArray[np.generic], geometry: Geometry,
                          spec: MaskOutput) -> NDArray[np.bool_]:
    """`binary_mask(mask_to_source(values, geometry), spec)` without a float source frame:
    the crop is thresholded, then placed (outside the crop the probability is 0, below any
    positive threshold)."""
    if spec.threshold <= 0:
        return binary_mask(mask_to_source(values, geometry), spec)
    plane = _mask_plane(values)
    box = geometry.box
    crop = binary_mask(resize_probability(plane, box.height, box.width), spec)
    return np.asarray(place_back(crop, box, geometry.source_shape), dtype=np.bool_)


def classify(values: NDArray[np.generic], spec: ProbabilitiesOutput) -> Finding:
    probs = np.asarray(values, dtype=np.float64).reshape(-1)
    if probs.shape[0] != len(spec.classes):
        raise ValueError(
            f"output '{spec.name}' has {probs.shape[0]} values for {len(spec.classes)} classes"
        )
    labels = [c.label for c in spec.classes]
    if spec.threshold is not None:
        positive = spec.positive_label
        index = labels.index(positive)
        if probs[index] >= spec.threshold:
            chosen = index
        else:
            others = [i for i in range(len(labels)) if i != index]
            chosen = max(others, key=lambda i: probs[i])
    else:
        chosen = int(np.argmax(probs))
    code = spec.classes[chosen].code
    return Finding(
        label=labels[chosen],
        code={"scheme": code.scheme, "value": code.value, "meaning": code.meaning},
        probability=float(probs[chosen]),
        probabilities={label: float(p) for label, p in zip(labels, probs, strict=True)},
    )


def gate_reason(finding: Finding, spec: ProbabilitiesOutput) -> str | None:
    """Why the image is ineligible for dependants, or None when it passes the gate."""
    if spec.gate is None or finding.label not in spec.gate.ineligible:
        return None
    return spec.gate.text_for(finding.label)


def gate_not_analysed(finding: Finding, spec: ProbabilitiesOutput, model_id: str
                      ) -> NotAnalysedReason | None:
    """The coded reason a gate stops the image with: the class's `gate.reasons` code, else
    the class's own code; the detail names the gate's model and its text."""
    text = gate_reason(finding, spec)
    if text is None or spec.gate is None:
        return None
    declared = spec.gate.reasons.get(finding.label)
    code = declared.code if declared is not None and declared.code is not None else next(
        c.code for c in spec.classes if c.label == finding.label)
    return NotAnalysedReason(code.value, code.meaning, f"{model_id}: {text}", code.scheme)


def measurement(values: NDArray[np.generic]) -> float:
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.shape[0] != 1:
        raise ValueError(f"a measurement is one number per image, got {flat.shape[0]}")
    return float(flat[0])


@dataclass(frozen=True)
class MeasuredValue:
    value: float
    unit: UcumUnit

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value,
                "unit": {"code": self.unit.code, "meaning": self.unit.meaning}}


def measured_values(
    values: NDArray[np.generic], spec: MeasurementOutput, geometry: Geometry | None
) -> list[MeasuredValue]:
    """What a measurement output reports for one image: the value in its declared unit; or,
    for a `pixel_measure`, source pixels first and then mm / mm2 when Pixel Spacing is known.

    A length is scaled by the geometric mean of the row and column factors: exact for an
    equivalent diameter (what area-derived lengths are), close for square-ish pixels.
    """
    raw = measurement(values)
    if spec.pixel_measure is None:
        return [MeasuredValue(raw, spec.reported_unit)]
    if geometry is None:
        raise ValueError(f"output '{spec.name}' is a size in the model's input pixels, but "
                         "the model's input geometry is unknown")
    rows, columns = geometry.size
    row_factor = geometry.box.height / rows
    column_factor = geometry.box.width / columns
    area = spec.pixel_measure == "area"

    def scaled(value: float, row: float, column: float) -> float:
        return value * (row * column if area else math.sqrt(row * column))

    in_source = scaled(raw, row_factor, column_factor)
    reported = [MeasuredValue(in_source, PIXEL_UNITS[spec.pixel_measure])]
    if geometry.pixel_spacing is not None:
        row_mm, column_mm = geometry.pixel_spacing
        reported.append(MeasuredValue(scaled(in_source, row_mm, column_mm),
                                      PHYSICAL_UNITS[spec.pixel_measure]))
    return reported


def _to_source(x: float, y: float, normalised: bool, geometry: Geometry) -> tuple[float, float]:
    box = geometry.box
    h, w = geometry.size
    fx, fy = (x, y) if normalised else (x / w, y / h)
    return box.left + fx * box.width, box.top + fy * box.height


def point_to_source(
    values: NDArray[np.generic], spec: PointOutput, geometry: Geometry
) -> list[float]:
    x, y = (float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)[:2])
    return list(_to_source(x, y, spec.coordinates == "normalised", geometry))


def box_to_source(
    values: NDArray[np.generic], spec: BoxOutput, geometry: Geometry
) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)[:4])
    normalised = spec.coordinates == "normalised"
    return [*_to_source(x0, y0, normalised, geometry), *_to_source(x1, y1, normalised, geometry)]

"""Fixture models with the output contracts of the diabetic-screening models (dr-grade, dme-risk,
lesion-seg, behind fundus-quality), computing simple things so a test knows every answer.

Images are read whole (no field-of-view crop), so each model sees the mean colour:
- fundus-quality: gradable when the mean green > 0.1 (an image with no green is ungradable);
- dr-grade: `dr_grade` = round(4 * mean blue) (none .. proliferative), `referable_dr` when the
  mean blue > 0.375 (threshold 0.5 on p = sigmoid(40 (b - 0.375)));
- dme-risk: `referable_dme` when the mean blue > 0.6;
- lesion-seg: `haemorrhages` red > 0.95, `hard_exudates` green > 0.95, `soft_exudates` blue > 0.95,
  `microaneurysms` never (an empty segment).
Codes are the verified table of docs/results.md ("Diabetic screening codes").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.support.onnx_models import (
    RegistryWriter,
    channel_threshold_segmenter,
    classifier_manifest,
    image_input,
    mean_colour_classifier,
    multi_head_classifier,
    private_code,
    segmenter_manifest,
)


def sct(value: str, meaning: str) -> dict[str, str]:
    return {"scheme": "SCT", "value": value, "meaning": meaning}


DR = sct("4855003", "Diabetic retinopathy")
GRADES = [
    ("none", private_code("DR000", "No apparent diabetic retinopathy")),
    ("mild", sct("312903003", "Mild nonproliferative diabetic retinopathy")),
    ("moderate", sct("312904009", "Moderate nonproliferative diabetic retinopathy")),
    ("severe", sct("312905005", "Severe nonproliferative diabetic retinopathy")),
    ("proliferative", sct("59276001", "Proliferative diabetic retinopathy")),
]
YES = sct("373066001", "Yes")
NO = sct("373067005", "No")
REFERABLE_DR = private_code("DR100", "Referable diabetic retinopathy")
DME = sct("312912001", "Diabetic macular edema")
ABNORMAL = sct("49755003", "Morphologically abnormal structure")
LESIONS = [  # (output, channel, threshold, label, type code)
    ("haemorrhages", 0, 0.95, "Haemorrhages", sct("50960005", "Hemorrhage")),
    ("hard_exudates", 1, 0.95, "Hard exudates", private_code("LES-HEX", "Hard exudate")),
    ("soft_exudates", 2, 0.95, "Soft exudates",
     private_code("LES-SEX", "Soft exudate (cotton wool spot)")),
    ("microaneurysms", 1, 1.5, "Microaneurysms",
     private_code("LES-MA", "Retinal microaneurysm")),
]


def _whole(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["inputs"] = [{**image_input(), "crop_fov": False}]
    manifest["modalities"] = ["OP", "XC"]
    return manifest


def _binary(name: str, concept: dict[str, str]) -> dict[str, Any]:
    return {"kind": "probabilities", "name": name, "concept": concept,
            "classes": [{"label": "non-referable", "code": NO},
                        {"label": "referable", "code": YES}],
            "positive": "referable", "threshold": 0.5, "summary": "worst"}


def _sigmoid_head(cut: float) -> tuple[list[list[float]], list[float]]:
    """Two logits (0, 40 (b - cut)) over the mean blue b."""
    return [[0.0, 0.0], [0.0, 0.0], [0.0, 40.0]], [0.0, -40.0 * cut]


def dr_grade_manifest() -> dict[str, Any]:
    m = _whole(classifier_manifest("dr-grade", gate=False, requires=["fundus-quality"]))
    m["outputs"] = [
        {"kind": "probabilities", "name": "dr_grade", "concept": DR,
         "classes": [{"label": label, "code": code} for label, code in GRADES],
         "summary": "worst"},
        _binary("referable_dr", REFERABLE_DR),
    ]
    return m


def dme_manifest() -> dict[str, Any]:
    m = _whole(classifier_manifest("dme-risk", gate=False, requires=["fundus-quality"]))
    m["outputs"] = [_binary("referable_dme", DME)]
    return m


def lesion_manifest() -> dict[str, Any]:
    m = _whole(segmenter_manifest("lesion-seg", requires=["fundus-quality"]))
    m["outputs"] = [
        {"kind": "mask", "name": name, "threshold": 0.5,
         "segment": {"label": label, "category": ABNORMAL, "type": code}}
        for name, _channel, _cut, label, code in LESIONS
    ]
    return m


def write_grading_registry(root: Path) -> RegistryWriter:
    writer = RegistryWriter(root)
    writer.add(_whole(classifier_manifest("fundus-quality")),
               mean_colour_classifier(weights=[[0, 0], [-40, 40], [0, 0]], bias=[4, -4]))
    # dr_grade logits A (k b - k^2 / 8), A = 80: largest at k = 4 b, margin A / 8 = 10
    grade_w = [[0.0] * 5, [0.0] * 5, [80.0 * k for k in range(5)]]
    grade_b = [-80.0 * k * k / 8 for k in range(5)]
    writer.add(dr_grade_manifest(), multi_head_classifier(
        [("dr_grade", grade_w, grade_b), ("referable_dr", *_sigmoid_head(0.375))]))
    writer.add(dme_manifest(), multi_head_classifier(
        [("referable_dme", *_sigmoid_head(0.6))]))
    writer.add(lesion_manifest(), channel_threshold_segmenter(
        [(name, channel, cut) for name, channel, cut, _label, _code in LESIONS]))
    return writer


def grading_image(blue: int, *, green: int = 120, size: int = 96,
                  lesions: bool = True) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A fundus-like disc on black with a constant blue plane (the grade) and lesion patches:
    a pure-red haemorrhage, a pure-green hard exudate and a pure-blue soft exudate."""
    rgb = np.zeros((size, size, 3), np.uint8)
    rows, cols = np.mgrid[0:size, 0:size]
    disc = (rows - size / 2) ** 2 + (cols - size / 2) ** 2 <= (size * 0.42) ** 2
    rgb[disc, 0] = 150
    rgb[disc, 1] = green
    rgb[..., 2] = blue
    if lesions:
        a, b, c, d = (int(v * size / 96) for v in (30, 42, 54, 66))
        rgb[a:b, a:b] = (255, 0, blue)  # haemorrhage
        rgb[c:d, a:b] = (150, 255, blue) if green else (150, 0, blue)  # hard exudate
        rgb[a:b, c:d] = (150, green, 255)  # soft exudate
    return rgb

"""The overlay shows each lesion mask in its own colour with a legend swatch, writes the DR grade
and referable flags in class words, and keeps its text in the corners off the retina."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from dicomnode.inference.decode import decode_rgb
from dicomnode.registry.manifest import Code
from dicomnode.results.model import AlgorithmInfo, Classification, ImageFindings, MaskResult
from dicomnode.results.overlay import (
    ALPHA,
    PALETTE,
    blend_masks,
    build_overlay,
    draw_text,
    finding_lines,
)
from dicomnode.synthetic import op_dataset
from tests.support.grading_models import (
    ABNORMAL,
    DR,
    GRADES,
    LESIONS,
    REFERABLE_DR,
    YES,
    grading_image,
)
from tests.unit.results.sources import dciodvfy, errors

SIZE = 768
LESION = AlgorithmInfo("lesion-seg", "Lesion segmentation", "1.0.0")
GRADER = AlgorithmInfo("dr-grade", "DR grade", "1.0.0")
QUALITY = AlgorithmInfo("fundus-quality", "Fundus quality", "1.0.0")


def _masks(rgb: np.ndarray[Any, Any]) -> list[MaskResult]:
    found = [rgb[..., 0] == 255, rgb[..., 1] == 255, rgb[..., 2] == 255]
    return [MaskResult(key=f"lesion-seg.{name}", label=label, category=Code(**ABNORMAL),
                       type=Code(**code), algorithm=LESION, mask=mask)
            for (name, _c, _t, label, code), mask in zip(LESIONS, found, strict=False)]


def _findings() -> ImageFindings:
    quality = Classification(QUALITY, Code(scheme="99DICOMNODE", value="QUAL", meaning="Image "
                             "quality"), Code(scheme="99DICOMNODE", value="GRAD",
                                              meaning="Gradable"), 0.97, label="gradable")
    grade = Classification(GRADER, Code(**DR), Code(**GRADES[3][1]), 0.91, label="severe",
                           severity=3)
    referable = Classification(GRADER, Code(**REFERABLE_DR), Code(**YES), 0.99,
                               label="referable", severity=1)
    return ImageFindings(classifications=[quality, grade, referable])


def test_lesions_legend_and_grade_words(tmp_path: Path) -> None:
    rgb = grading_image(191, size=SIZE)
    source = op_dataset(rgb, laterality="R")
    masks = _masks(rgb)
    sc = build_overlay(source, masks, _findings())
    path = tmp_path / "overlay.dcm"
    sc.save_as(path)
    assert errors(dciodvfy(path)) == []
    whole = pydicom.dcmread(path).pixel_array.astype(np.float32)
    pixels = whole[:SIZE]  # text that found no free corner goes on a band below the fundus
    fundus = decode_rgb(source).astype(np.float32)
    # Each lesion tinted in its own palette colour (the patches lie inside the retina, where
    # no text goes).
    for index, mask in enumerate(m.mask for m in masks):
        expected = fundus[mask] * (1 - ALPHA) + np.array(PALETTE[index]) * ALPHA
        assert np.abs(pixels[mask] - expected).max() <= 1.0, index
    # The retina's centre is the blended fundus: no text there.
    blended = blend_masks(decode_rgb(source), masks).astype(np.float32)
    core = np.zeros(rgb.shape[:2], bool)
    core[SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = True
    assert np.array_equal(pixels[core], blended[core])
    # The legend's swatches: a block of exactly the first mask's colour exists.
    assert np.all(whole == np.array(PALETTE[0]), axis=2).sum() >= 100


def test_text_lines_use_class_words_grades_first() -> None:
    rgb = grading_image(191)
    lines = finding_lines(_masks(rgb), _findings())
    assert lines[1:4] == ["[yellow] Haemorrhages", "[cyan] Hard exudates",
                          "[magenta] Soft exudates"]
    grade_at = lines.index("Diabetic retinopathy: severe (0.91)")
    assert lines[grade_at + 1] == "Referable diabetic retinopathy: referable (0.99)"
    assert grade_at < lines.index("Image quality: gradable (0.97)")
    assert not any("312905005" in line for line in lines)  # words, not codes


def _changed_corners(before: np.ndarray[Any, Any], after: np.ndarray[Any, Any]) -> set[str]:
    h, w = before.shape[:2]
    quads = {"top-left": (slice(0, h // 2), slice(0, w // 2)),
             "top-right": (slice(0, h // 2), slice(w // 2, w)),
             "bottom-left": (slice(h // 2, h), slice(0, w // 2)),
             "bottom-right": (slice(h // 2, h), slice(w // 2, w))}
    return {name for name, q in quads.items() if not np.array_equal(before[q], after[q])}


def test_blocks_go_to_the_corners_that_cover_least_retina() -> None:
    image = np.full((400, 400, 3), 40, np.uint8)
    legend = [("legend", None), ("[yellow] Haemorrhages", PALETTE[0])]
    lines = ["Diabetic retinopathy: severe"]
    right = np.zeros((400, 400), bool)
    right[:, 200:] = True  # the retina on the right: text goes left
    assert _changed_corners(image, draw_text(image, legend, lines, avoid=right)) == {
        "top-left", "bottom-left"}
    left = ~right
    assert _changed_corners(image, draw_text(image, legend, lines, avoid=left)) == {
        "top-right", "bottom-right"}

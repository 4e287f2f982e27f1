"""Overlay Secondary Capture: valid, same study, masks visible where they are, text burned in."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.inference.decode import decode_rgb
from dicomnode.results.overlay import ALPHA, PALETTE, build_overlay, finding_lines
from tests.unit.results.sources import (
    SOURCE_KINDS,
    SourceKind,
    dciodvfy,
    errors,
    findings_for,
    masks_for,
    source_image,
    ungradable,
)


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_overlay_passes_dciodvfy(tmp_path: Path, kind: SourceKind) -> None:
    source, vessels, disc = source_image(kind, size=128)
    sc = build_overlay(source, masks_for(vessels, disc), findings_for(vessels, disc))
    path = tmp_path / "overlay.dcm"
    sc.save_as(path)
    lines = dciodvfy(path)
    assert lines[0] == "SCImage", lines
    assert errors(lines) == [], "\n".join(lines)
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.BurnedInAnnotation == "YES"
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "vessel-seg@1.2.0" in back.SoftwareVersions


def test_masks_are_tinted_and_the_rest_is_the_fundus(tmp_path: Path) -> None:
    source, vessels, disc = source_image("op", size=256)
    sc = build_overlay(source, masks_for(vessels, disc), findings_for(vessels, disc))
    rgb = decode_rgb(source).astype(np.float32)
    # The legend goes on a band below the fundus (no free corner in this square frame).
    pixels = sc.pixel_array.astype(np.float32)[: rgb.shape[0]]
    below_text = np.ones_like(vessels)
    plain = below_text & ~vessels & ~disc
    assert np.array_equal(pixels[plain], rgb[plain])
    for mask, colour in ((disc & ~vessels & below_text, PALETTE[1]),):
        if not mask.any():
            continue
        expected = rgb[mask] * (1 - ALPHA) + np.array(colour) * ALPHA
        assert np.abs(pixels[mask] - expected).max() <= 1.0
    tinted = vessels & ~disc & below_text
    assert tinted.any()
    expected = rgb[tinted] * (1 - ALPHA) + np.array(PALETTE[0]) * ALPHA
    assert np.abs(pixels[tinted] - expected).max() <= 1.0
    # Text was written on the band below.
    assert sc.pixel_array[rgb.shape[0]:].max() >= 250


def test_findings_text_names_the_gate() -> None:
    lines = finding_lines([], ungradable())
    assert "NOT ANALYSED: Ungradable" in lines


def test_blending_only_the_tinted_pixels_gives_the_whole_image_blend_bit_for_bit() -> None:
    """blend_masks works on the tinted pixels only; the pixels must equal blending every pixel
    in float32 (as it did before), overlapping masks included."""
    from dicomnode.results.overlay import blend_masks

    source, vessels, disc = source_image("op", size=128)
    rgb = decode_rgb(source)
    rng = np.random.default_rng(5)
    masks = masks_for(vessels, disc)
    # A third, random mask overlapping both.
    extra = rng.random(vessels.shape) < 0.3
    masks = [*masks, dataclasses.replace(masks[0], mask=extra)]
    whole = rgb.astype(np.float32)
    for index, mask in enumerate(masks):
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        where = mask.mask.astype(bool)
        whole[where] = whole[where] * (1 - ALPHA) + colour * ALPHA
    expected = np.clip(np.rint(whole), 0, 255).astype(np.uint8)
    assert np.array_equal(blend_masks(rgb, masks), expected)
    assert np.array_equal(blend_masks(rgb, []), rgb)

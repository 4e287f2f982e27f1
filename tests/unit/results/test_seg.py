"""SEG from OP (with and without Pixel Spacing), VL Photographic and SC sources."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from dicomnode.results.seg import SegmentationError, build_segmentation, source_class_of
from tests.unit.results.sources import (
    SOURCE_KINDS,
    SourceKind,
    dciodvfy,
    errors,
    masks_for,
    source_image,
)


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_seg_passes_dciodvfy_and_reads_back_pixel_for_pixel(
    tmp_path: Path, kind: SourceKind
) -> None:
    source, vessels, disc = source_image(kind)
    original_class = source.SOPClassUID
    masks = masks_for(vessels, disc)
    seg = build_segmentation(source, masks, series_number=901)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)

    lines = dciodvfy(path)
    assert lines[0] == "Segmentation", lines
    assert errors(lines) == [], "\n".join(lines)

    back = hd.seg.segread(path)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.Manufacturer == "dicomnode"
    assert "vessel-seg@1.2.0" in back.SoftwareVersions
    assert (back.Rows, back.Columns) == vessels.shape
    # The source is referenced with its real SOP Class, and was left unchanged.
    assert source.SOPClassUID == original_class
    assert source_class_of(back) == original_class
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1, 2],
    )[0]
    assert np.array_equal(pixels[..., 0].astype(bool), vessels)
    assert np.array_equal(pixels[..., 1].astype(bool), disc)
    for number, mask in enumerate(masks, start=1):
        description = back.get_segment_description(number)
        assert description.segment_label == mask.label
        assert description.segmented_property_type.value == mask.type.value
        assert description.TrackingID == mask.key
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert algorithm[0].AlgorithmName == mask.algorithm.name
        assert algorithm[0].AlgorithmVersion == mask.algorithm.version
    # No pixel measures (see seg.py); the source keeps its Pixel Spacing where it had one.
    assert "PixelMeasuresSequence" not in back.SharedFunctionalGroupsSequence[0]
    assert ("PixelSpacing" in source) == (kind == "op-spacing")


def test_empty_mask_is_kept_as_an_empty_segment(tmp_path: Path) -> None:
    source, vessels, disc = source_image("op")
    masks = masks_for(np.zeros_like(vessels), disc)
    seg = build_segmentation(source, masks)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert errors(dciodvfy(path)) == []
    back = hd.seg.segread(path)
    assert back.NumberOfFrames == 2
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1, 2])[0]
    assert not pixels[..., 0].any()
    assert np.array_equal(pixels[..., 1].astype(bool), disc)


def test_mask_of_wrong_size_is_refused() -> None:
    source, vessels, disc = source_image("op")
    masks = masks_for(vessels[:-1], disc)
    with pytest.raises(SegmentationError, match=r"vessel-seg\.vessel_mask"):
        build_segmentation(source, masks)


def test_private_codes_are_declared(tmp_path: Path) -> None:
    source, vessels, disc = source_image("vl")
    masks = masks_for(vessels, disc)
    private = masks[0].type.model_copy(update={"scheme": "99DICOMNODE", "value": "VES"})
    masks[0] = type(masks[0])(**{**masks[0].__dict__, "type": private})
    seg = build_segmentation(source, masks)
    declared = [i.CodingSchemeDesignator for i in seg.CodingSchemeIdentificationSequence]
    assert declared == ["99DICOMNODE"]


def test_the_validator_check_can_fail(tmp_path: Path) -> None:
    """Without Patient Orientation (2C) dciodvfy reports an error: a clean run means something."""
    source, vessels, disc = source_image("op")
    seg = build_segmentation(source, masks_for(vessels, disc))
    del seg.PatientOrientation
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert any("PatientOrientation" in line for line in errors(dciodvfy(path)))

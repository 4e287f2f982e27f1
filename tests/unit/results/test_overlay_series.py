"""Derived images of a two-eye study without header laterality: one series per eye, Laterality
from the laterality model, dciodvfy and dcentvfy clean; the legend never covers the retina."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.fov import find_field_of_view
from dicomnode.registry.manifest import Code
from dicomnode.results.encode import OVERLAY, SEG, encode_objects
from dicomnode.results.job_outputs import JobResults
from dicomnode.results.model import AlgorithmInfo, Classification
from dicomnode.results.overlay import blend_masks, build_overlay, place_legend
from dicomnode.results.sr import NodeIdentity
from dicomnode.routing.preset import OutputOptions
from dicomnode.synthetic import synthetic_fundus
from tests.support.peers import require_tool
from tests.unit.results.sources import (
    SourceKind,
    dciodvfy,
    errors,
    findings_for,
    masks_for,
    source_image,
)

LATERALITY_MODEL = AlgorithmInfo(model_id="laterality", name="Eye side", version="1.0.0")
LATERALITY = Code(scheme="SCT", value="272741003", meaning="Laterality")
SIDES = {"R": Code(scheme="SCT", value="24028007", meaning="Right"),
         "L": Code(scheme="SCT", value="7771000", meaning="Left")}
NODE = NodeIdentity(uid=generate_uid(), name="DICOMNODE")


def _study_without_header_laterality(kind: SourceKind) -> tuple[list[pydicom.Dataset],
                                                                 JobResults]:
    """Two images per eye, neither header saying which eye; the laterality model does."""
    study = generate_uid()
    sources, results = [], JobResults()
    for seed, side in enumerate("RLRL"):
        source, vessels, disc = source_image(kind, laterality=side,  # type: ignore[arg-type]
                                             size=160, seed=seed, study_uid=study)
        # One study as a camera sends it: the same study attributes on every image.
        source.StudyDate, source.StudyTime = "20261201", "101500"
        for keyword in ("ImageLaterality", "Laterality"):
            if keyword in source:
                delattr(source, keyword)
        uid = str(source.SOPInstanceUID)
        results.masks[uid] = masks_for(vessels, disc)
        findings = findings_for(vessels, disc)
        said = Classification(LATERALITY_MODEL, LATERALITY, SIDES[side], 0.97)
        results.findings[uid] = replace(
            findings, classifications=[*findings.classifications, said],
            inferred_laterality=side)
        sources.append(source)
    return sources, results


@pytest.mark.parametrize("kind", ["op", "sc"])
def test_derived_series_hold_one_eye_each_and_validate(tmp_path: Path, kind: SourceKind) -> None:
    dcentvfy = require_tool("dcentvfy", "dicom3tools")
    sources, results = _study_without_header_laterality(kind)
    side_of = {str(s.SOPInstanceUID): "RLRL"[i] for i, s in enumerate(sources)}
    objects = encode_objects(sources, results, OutputOptions(sr=True, seg=True, overlay=True),
                             node=NODE, seed="job-1")
    paths = []
    for index, obj in enumerate(objects):
        path = tmp_path / f"{index}-{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
        if obj.kind in (SEG, OVERLAY):
            lines = dciodvfy(path)
            assert errors(lines) == [], (obj.kind, lines)
            assert obj.source_uid is not None
            word = {"R": "right eye", "L": "left eye"}[side_of[obj.source_uid]]
            assert obj.dataset.SeriesDescription.endswith(word)
        if obj.kind == OVERLAY:
            assert obj.source_uid is not None
            assert obj.dataset.Laterality == side_of[obj.source_uid]
            assert "inferred from the image by laterality@1.0.0" in (
                obj.dataset.DerivationDescription)
    for kind_ in (SEG, OVERLAY):
        series: dict[str, set[str]] = {}
        for obj in objects:
            if obj.kind == kind_:
                series.setdefault(str(obj.dataset.SeriesInstanceUID), set()).add(
                    side_of[str(obj.source_uid)])
        assert sorted(map(sorted, series.values())) == [["L"], ["R"]], (kind_, series)
    # dcentvfy compares the study, series and patient attributes across all the objects.
    check = subprocess.run([dcentvfy, *map(str, paths)], capture_output=True, text=True,
                           timeout=120)
    found = [line for line in (check.stdout + check.stderr).splitlines()
             if line.startswith("Error")]
    assert found == [], "\n".join(found)


def test_header_laterality_wins_and_is_named_as_the_origin() -> None:
    source, vessels, disc = source_image("op", laterality="R", size=128)
    findings = replace(findings_for(vessels, disc), inferred_laterality="L")
    sc = build_overlay(source, masks_for(vessels, disc), findings)
    assert sc.Laterality == "R"
    assert "from the source header" in sc.DerivationDescription
    assert sc.SeriesDescription.endswith("right eye")


def test_unknown_eye_leaves_laterality_empty_but_present(tmp_path: Path) -> None:
    source, vessels, disc = source_image("op", size=128)
    del source.ImageLaterality
    sc = build_overlay(source, masks_for(vessels, disc), findings_for(vessels, disc))
    assert "Laterality" in sc and sc.Laterality == ""
    path = tmp_path / "overlay.dcm"
    sc.save_as(path)
    assert errors(dciodvfy(path)) == []


def test_legend_uses_a_free_corner_of_a_wide_frame() -> None:
    # A 4:3 frame with the round fundus in the middle: the side margins are free.
    fundus = synthetic_fundus(480, "R", 0)
    frame = np.zeros((480, 640, 3), dtype=np.uint8)
    frame[:, 80:560] = fundus
    retina = find_field_of_view(frame).mask
    place = place_legend(retina, 60, 40)
    assert place.extra_rows == 0
    assert not retina[place.y:place.y + 40, place.x:place.x + 60].any()


def test_legend_never_covers_the_retina() -> None:
    """A fundus filling the frame leaves no free corner: the legend goes on a band below."""
    source, vessels, disc = source_image("op", size=256)
    plain = decode_rgb(source)
    sc = build_overlay(source, masks_for(vessels, disc), findings_for(vessels, disc))
    pixels = sc.pixel_array
    assert pixels.shape[1] == plain.shape[1]
    assert pixels.shape[0] > plain.shape[0]  # a band for the legend
    expected = blend_masks(plain, masks_for(vessels, disc))
    retina = find_field_of_view(plain).mask
    assert np.array_equal(pixels[:256][retina], expected[retina])
    band = pixels[256:]
    assert band.max() >= 250  # the legend's white text is there

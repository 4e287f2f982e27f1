"""TID 1500 report over a study of OP, VL and SC images, one of them stopped by the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode.results.codes import NOT_ANALYSED, PRIVATE_SCHEME
from dicomnode.results.model import ImageFindings
from dicomnode.results.seg import build_segmentation
from dicomnode.results.sr import NodeIdentity, ReportError, build_report
from tests.unit.results.sources import (
    QUALITY_CONCEPT,
    UNGRADABLE,
    content_items,
    dciodvfy,
    errors,
    findings_for,
    masks_for,
    source_image,
    ungradable,
)

NODE = NodeIdentity(uid="1.2.826.0.1.3680043.8.498.1", name="DICOMNODE")


def _study() -> tuple[list[Dataset], dict[str, ImageFindings], list[Dataset]]:
    study = generate_uid()
    sources: list[Dataset] = []
    findings: dict[str, ImageFindings] = {}
    segs: list[Dataset] = []
    layout: list[tuple[Any, str]] = [("op", "R"), ("op-spacing", "L"), ("vl", "R"), ("sc", "L")]
    for number, (kind, side) in enumerate(layout, start=1):
        source, vessels, disc = source_image(kind, laterality=side, seed=number,  # type: ignore[arg-type]
                                             study_uid=study)
        source.InstanceNumber = number
        sources.append(source)
        if kind == "sc":
            findings[source.SOPInstanceUID] = ungradable()
            continue
        segs.append(build_segmentation(source, masks_for(vessels, disc)))
        findings[source.SOPInstanceUID] = findings_for(vessels, disc)
    return sources, findings, segs



def test_report_passes_dciodvfy_and_reads_back(tmp_path: Path) -> None:
    sources, findings, segs = _study()
    sr = build_report(sources, findings, segs, node=NODE)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    lines = dciodvfy(path)
    assert lines[0] == "ComprehensiveSR", lines
    assert errors(lines) == [], "\n".join(lines)
    # The only warnings are about the private scheme, which the object declares.
    assert all("99DICOMNODE" in line for line in lines[1:]), "\n".join(lines)

    back = hd.sr.srread(path)
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.PatientID == sources[0].PatientID
    assert back.Manufacturer == "dicomnode"
    assert {"vessel-seg@1.2.0", "quality@2.0.0", "vessel-density@1.0.0"} <= set(
        back.SoftwareVersions)
    assert [i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence] == [
        PRIVATE_SCHEME]
    report: Any = back.content  # a MeasurementReport once read back
    # The observer device is the node.
    assert any(getattr(i, "UID", None) == NODE.uid for i in content_items(back.ContentSequence))

    for source, seg in zip(sources[:3], segs, strict=True):
        expected = findings[source.SOPInstanceUID]
        image_groups = report.get_image_measurement_groups(
            referenced_sop_instance_uid=source.SOPInstanceUID)
        evaluations = [e for g in image_groups for e in g.get_qualitative_evaluations()]
        assert [(e.name.value, e.value.value) for e in evaluations] == [
            (c.concept.value, c.value.value) for c in expected.classifications]
        site = image_groups[0].finding_sites[0]
        assert site.value == codes.SCT.Retina
        assert site.laterality == (codes.SCT.Right if source.get("ImageLaterality", source.get(
            "Laterality")) == "R" else codes.SCT.Left)

        segment_groups = report.get_volumetric_roi_measurement_groups(
            referenced_sop_instance_uid=seg.SOPInstanceUID)
        assert len(segment_groups) == 2
        by_segment = {}
        for group in segment_groups:
            ref = group.referenced_segment
            assert ref is not None
            image_ref = ref[0].ReferencedSOPSequence[0]
            assert image_ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
            # Segment number only: dciodvfy objects to a frame number beside it.
            assert "ReferencedFrameNumber" not in image_ref
            by_segment[int(image_ref.ReferencedSegmentNumber)] = group
        measured = {m.mask_key: m for m in expected.measurements}
        for number, key in ((1, "vessel-seg.vessel_mask"), (2, "disc-seg.disc_mask")):
            group = by_segment[number]
            [measurement] = group.get_measurements()
            want = measured[key]
            assert measurement.name.value == want.code.value
            assert measurement.value == pytest.approx(want.value, rel=1e-9)
            assert measurement.unit.value == want.unit.code
            assert _algorithm(measurement) == (want.algorithm.name, want.algorithm.version)
        disc_site = by_segment[2].finding_sites[0]
        assert disc_site.value == codes.SCT.OpticNerveHead

        planar = report.get_planar_roi_measurement_groups(
            referenced_sop_instance_uid=source.SOPInstanceUID)
        regions = {g.finding_type.value: g.roi for g in planar}
        for region in expected.regions:
            roi = regions[region.code.value]
            assert roi is not None
            data = roi.value
            if region.kind == "point":
                assert roi.graphic_type.value == "POINT"
                assert data.tolist() == [list(region.coordinates)]
            else:
                x0, y0, x1, y1 = region.coordinates
                assert roi.graphic_type.value == "POLYLINE"
                assert data.tolist() == [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_ungradable_image_says_not_analysed(tmp_path: Path) -> None:
    sources, findings, segs = _study()
    path = tmp_path / "sr.dcm"
    build_report(sources, findings, segs, node=NODE).save_as(path)
    report: Any = hd.sr.srread(path).content
    groups = report.get_image_measurement_groups(
        referenced_sop_instance_uid=sources[3].SOPInstanceUID)
    evaluations = {e.name.value: e.value for g in groups for e in g.get_qualitative_evaluations()}
    assert evaluations[NOT_ANALYSED.value].value == UNGRADABLE.value
    assert evaluations[QUALITY_CONCEPT.value].value == UNGRADABLE.value
    assert _algorithm(groups[0]) == ("Image quality gate", "2.0.0")


def test_predecessor_is_listed(tmp_path: Path) -> None:
    sources, findings, segs = _study()
    first = build_report(sources, findings, segs, node=NODE)
    second = build_report(sources, findings, segs, node=NODE, predecessor=first)
    path = tmp_path / "sr2.dcm"
    second.save_as(path)
    assert errors(dciodvfy(path)) == []
    back = hd.sr.srread(path)
    ref = back.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first


def test_sources_of_two_studies_are_refused() -> None:
    a, _, _ = source_image("op")
    b, _, _ = source_image("op")
    with pytest.raises(ReportError, match="2 studies"):
        build_report([a, b], {}, node=NODE)



def _algorithm(item: Any) -> tuple[str, str]:
    """(Algorithm Name, Algorithm Version) of the TID 4019 items directly under `item`."""
    values = {}
    for child in item[0].ContentSequence:
        code = child.ConceptNameCodeSequence[0].CodeValue
        if code in ("111001", "111003"):
            values[code] = str(child.TextValue)
    return values["111001"], values["111003"]


def _laterality_modifiers(sr: Dataset) -> list[str]:
    """The code value of every Laterality (SCT 272741003) item in the report."""
    return [str(item.ConceptCodeSequence[0].CodeValue)
            for item in content_items(sr.ContentSequence)
            if "ConceptNameCodeSequence" in item and "ConceptCodeSequence" in item
            and item.ConceptNameCodeSequence[0].CodeValue == "272741003"]


def _tracking_ids(sr: Dataset) -> list[str]:
    return [str(item.TextValue) for item in content_items(sr.ContentSequence)
            if item.get("ValueType") == "TEXT"
            and item.ConceptNameCodeSequence[0].CodeValue == "112039"]  # Tracking Identifier


@pytest.mark.parametrize(("header", "inferred", "expected", "label"), [
    (None, "L", "7771000", "left eye (from image)"),  # no header: the model's side is used
    ("R", "L", "24028007", "right eye image"),  # the header wins over the model
    (None, None, None, "eye ?"),  # neither: no laterality is claimed
])
def test_finding_site_laterality_falls_back_to_the_laterality_model(
    tmp_path: Path, header: str | None, inferred: str | None, expected: str | None, label: str
) -> None:
    source, vessels, disc = source_image("op", laterality="R", seed=5)
    del source.ImageLaterality
    if header is not None:
        source.ImageLaterality = header
    findings = findings_for(vessels, disc)
    findings = ImageFindings(
        classifications=findings.classifications, measurements=findings.measurements,
        finding_sites=findings.finding_sites, inferred_laterality=inferred)
    sr = build_report([source], {source.SOPInstanceUID: findings}, node=NODE)
    sides = _laterality_modifiers(sr)
    assert set(sides) == ({expected} if expected else set())
    ids = _tracking_ids(sr)
    assert ids and all(label in text for text in ids), ids
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert errors(dciodvfy(path)) == []

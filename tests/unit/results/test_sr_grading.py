"""The report carries the grading: fixture models with the diabetic-screening contracts run
through the executor, their stored outputs become SEG and SR, the SR holds coded grades, flags,
probabilities and a study summary (worst eye, not-analysed images), and dciodvfy accepts all."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicomnode.graph import Selection, resolve
from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.executor import GraphExecutor
from dicomnode.inference.outputs import write_outputs
from dicomnode.inference.preprocess import SourceImage
from dicomnode.inference.sessions import SessionPool
from dicomnode.registry import load_registry
from dicomnode.registry.manifest import Code
from dicomnode.results.job_outputs import JobResults, results_from_outputs
from dicomnode.results.model import AlgorithmInfo, Classification, ImageFindings
from dicomnode.results.seg import build_segmentation
from dicomnode.results.sr import NodeIdentity, build_report, study_summary
from dicomnode.synthetic import op_dataset
from tests.support.grading_models import grading_image, write_grading_registry
from tests.unit.results.sources import content_items, dciodvfy, errors

NODE = NodeIdentity(uid="1.2.826.0.1.3680043.8.498.7", name="DICOMNODE")


def _name(item: Any) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _value(item: Any) -> str:
    return str(item.ConceptCodeSequence[0].CodeValue)


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], JobResults]:
    """A right eye graded severe (blue .75), a left eye mild (blue .25), an ungradable left."""
    root = tmp_path_factory.mktemp("grading")
    write_grading_registry(root / "registry")
    registry = load_registry(root / "registry")
    assert registry.left_out == (), registry.left_out
    study = generate_uid()
    sources = [
        op_dataset(grading_image(191), laterality="R", study_uid=study, instance_number=1),
        op_dataset(grading_image(64), laterality="L", study_uid=study, instance_number=2),
        op_dataset(grading_image(64, green=0), laterality="L", study_uid=study,
                   instance_number=3),
    ]
    graph = resolve(Selection.of(["dr-grade", "dme-risk", "lesion-seg"], modality="OP"),
                    registry)
    executor = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"],
                                                   intra_op_threads=1), max_batch=4)
    images = [SourceImage(str(s.SOPInstanceUID), decode_rgb(s), str(s.ImageLaterality))
              for s in sources]
    folder = root / "job"
    write_outputs(folder, executor.run(graph, images), registry, {"job": 1})
    return sources, results_from_outputs(folder, registry)


def test_classifications_carry_label_and_severity(
    graded: tuple[list[Dataset], JobResults]
) -> None:
    sources, results = graded
    right, left, ungradable = (results.findings[str(s.SOPInstanceUID)] for s in sources)
    by_concept = {c.concept.value: c for c in right.classifications}
    assert (by_concept["4855003"].label, by_concept["4855003"].severity) == ("severe", 3)
    assert by_concept["4855003"].value.value == "312905005"
    assert (by_concept["DR100"].label, by_concept["DR100"].severity) == ("referable", 1)
    assert by_concept["312912001"].value.value == "373066001"  # Yes
    assert by_concept["QUAL"].severity is None  # the gate does not feed the summary
    left_grade = {c.concept.value: c for c in left.classifications}["4855003"]
    assert (left_grade.label, left_grade.severity) == ("mild", 1)
    assert ungradable.not_analysed is not None
    assert {c.concept.value for c in ungradable.classifications} == {"QUAL"}
    assert [m.key for m in results.masks[str(sources[0].SOPInstanceUID)]] == [
        "lesion-seg.haemorrhages", "lesion-seg.hard_exudates", "lesion-seg.soft_exudates",
        "lesion-seg.microaneurysms"]
    assert str(sources[2].SOPInstanceUID) not in results.masks  # gated: no lesion masks


def test_report_summary_grades_and_lesions_pass_dciodvfy(
    graded: tuple[list[Dataset], JobResults], tmp_path: Path
) -> None:
    sources, results = graded
    segs = [build_segmentation(s, results.masks[str(s.SOPInstanceUID)], instance_number=n)
            for n, s in enumerate(sources[:2], start=1)]
    sr = build_report(sources, results.findings, segs, node=NODE)
    for name, obj in (("seg", segs[0]), ("sr", sr)):
        path = tmp_path / f"{name}.dcm"
        obj.save_as(path)
        report = dciodvfy(path)
        assert errors(report) == [], "\n".join(report)

    content = sr.ContentSequence
    top = [_name(item) for item in content]
    summary = next(item for item in content if _name(item) == "C0034375")
    assert top.index("C0034375") > top.index("126010")  # TID 1500 order: after measurements
    lines = {(_name(i), _value(i)): [str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                                     for r in i.ContentSequence]
             for i in summary.ContentSequence}
    right, left, ungradable = (str(s.SOPInstanceUID) for s in sources)
    assert lines == {
        ("4855003", "312905005"): [right],  # worst DR grade: severe NPDR, from the right eye
        ("DR100", "373066001"): [right],  # referable DR: yes
        ("312912001", "373066001"): [right],  # referable DME: yes
        ("NOT-ANALYSED", "UNGR"): [ungradable],  # listed as not analysed
    }
    assert left not in {uid for uids in lines.values() for uid in uids}

    # Per image: the coded grade with its probability as a property.
    grades = [i for i in content_items(content) if "ConceptCodeSequence" in i
              and _name(i) == "4855003" and i.RelationshipType == "CONTAINS"
              and "ContentSequence" in i and i.ContentSequence[0].ValueType == "NUM"]
    assert sorted(_value(g) for g in grades) == ["312903003", "312905005"]
    for grade in grades:
        [probability] = grade.ContentSequence
        assert probability.RelationshipType == "HAS PROPERTIES"
        assert _name(probability) == "122157"
        value = float(probability.MeasuredValueSequence[0].NumericValue)
        assert 0.99 < value <= 1.0  # the fixture's margin of 10 logits

    # Lesions: one TID 1411 group per segment of the right eye's SEG, by segment number.
    segment_refs = [i for i in content_items(content) if _name(i) == "121191"]
    refs_to_right = [r for r in segment_refs if str(
        r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == str(segs[0].SOPInstanceUID)]
    assert sorted(int(r.ReferencedSOPSequence[0].ReferencedSegmentNumber)
                  for r in refs_to_right) == [1, 2, 3, 4]
    findings = {_value(i) for i in content_items(content)
                if "ConceptCodeSequence" in i and _name(i) == "121071"}
    assert {"50960005", "LES-HEX", "LES-SEX", "LES-MA"} <= findings


def _grade(severity: int, value: str) -> Classification:
    algorithm = AlgorithmInfo("dr-grade", "DR grade", "1.0.0")
    return Classification(algorithm, Code(scheme="SCT", value="4855003", meaning="DR"),
                          Code(scheme="SCT", value=value, meaning=value), 0.9,
                          label=value, severity=severity)


def test_study_summary_keeps_every_image_at_the_worst_class() -> None:
    sides: tuple[Literal["R", "L"], ...] = ("R", "L", "L")
    a, b, c = (op_dataset(grading_image(64), laterality=side) for side in sides)
    findings = {str(a.SOPInstanceUID): ImageFindings(classifications=[_grade(2, "moderate")]),
                str(b.SOPInstanceUID): ImageFindings(classifications=[_grade(1, "mild")]),
                str(c.SOPInstanceUID): ImageFindings(classifications=[_grade(2, "moderate")])}
    [(worst, images)] = study_summary([a, b, c], findings)
    assert worst.label == "moderate"
    assert [s.SOPInstanceUID for s in images] == [a.SOPInstanceUID, c.SOPInstanceUID]
    assert study_summary([a], {}) == []

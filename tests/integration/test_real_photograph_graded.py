"""A real graded photograph, end to end: IDRiD test images (a referable and a grade-0 eye)
wrapped as Ophthalmic Photography, sent by DCMTK storescu to a real `dicomnode serve` with the
shipped registry and a preset that switches the grading models on, come back to Orthanc with a
coded DR grade, the referable flags, a worse-eye study summary and the lesion SEG segments,
read back from the PACS and passing dciodvfy.

The figures of the models are not judged here (their cards do that): this proves the wiring a
screening programme relies on, on real photographs rather than synthetic ones.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Job, Result
from dicomnode.synthetic import op_dataset
from tests.support.node import NODE_AE, NodeProcess, wait_until_delivered, write_config
from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port, require_tool, unavailable
from tests.unit.results.sources import content_items, dciodvfy, errors

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IDRID = ROOT.parent / "shared" / "data" / "IDRiD" / "grading"
DR_GRADE = "4855003"  # SCT Diabetic retinopathy (docs/results.md)
REFERABLE_DR = "DR100"
REFERABLE_DME = "312912001"
YES_NO = {"373066001", "373067005"}
GRADE_CODES = ["DR000", "312903003", "312904009", "312905005", "59276001"]  # none .. PDR
SUMMARY = "C0034375"  # UMLS Qualitative Evaluations: the TID 1500 study summary
PRESET = """\
id: screening-graded
name: Diabetic screening with the grading models
audience: Tests
description: diabetic-screening with dr-grade, dme-risk and lesion-seg switched on.
models: [fundus-quality, vessel-seg, optic-disc, vessel-metrics, disc-metrics, dr-grade,
         dme-risk, lesion-seg]
outputs: {sr: true, seg: true, overlay: true}
destinations: [pacs]
routing: {modality: OP}
priority: 10
"""


# A PDR eye with referable maculopathy and a grade-0 eye of the official test split, both
# gradable (the quality gate stops IDRiD_001, which is why it is not the PDR example).
EYES = ("IDRiD_002.jpg", "IDRiD_029.jpg")


def _two_eyes() -> list[tuple[str, int]]:
    if not (IDRID / "test_labels.csv").is_file():
        unavailable(f"IDRiD grading data not found under {IDRID}")
    with (IDRID / "test_labels.csv").open() as handle:
        grades = {r["image"]: int(r["dr_grade"]) for r in csv.DictReader(handle)}
    assert (grades[EYES[0]], grades[EYES[1]]) == (4, 0)
    return [(name, grades[name]) for name in EYES]


def _codes(sr: Any) -> list[tuple[str, str]]:
    return [(str(i.ConceptNameCodeSequence[0].CodeValue), str(i.ConceptCodeSequence[0].CodeValue))
            for i in content_items(sr.ContentSequence) if i.ValueType == "CODE"]


def test_real_photographs_come_back_graded_with_lesion_segments(tmp_path: Path) -> None:
    require_tool("dciodvfy", "dicom3tools")
    storescu = require_tool("storescu", "dcmtk")
    eyes = _two_eyes()
    files = []
    study_uid = pydicom.uid.generate_uid()
    sides: list[Literal["L", "R"]] = ["R", "L"]
    for number, ((name, _grade), side) in enumerate(zip(eyes, sides, strict=True), 1):
        rgb = np.asarray(Image.open(IDRID / "test" / name).convert("RGB"))
        ds = op_dataset(rgb, laterality=side, study_uid=study_uid, instance_number=number,
                        patient_id="IDRID0001")
        path = tmp_path / f"{side}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "screening-graded.yaml").write_text(PRESET)
    orthanc = Orthanc(tmp_path / "pacs", free_port(), free_port())
    orthanc.start()
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    config = write_config(
        tmp_path, db_url,
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        registry={"path": str(ROOT / "model_registry")},
        presets={"path": str(presets)},
        modality_defaults={"OP": "screening-graded"},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.5},
        dispatch={"first_delay_seconds": 0.5, "poll_seconds": 0.2},
    )
    database = Database(db_url)
    try:
        with NodeProcess(config) as node:
            subprocess.run([storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1",
                            str(node.port), *map(str, files)],
                           check=True, capture_output=True, timeout=120)
            wait_until_delivered(database, node, timeout=300, poll=0.5)
        with database.transaction() as session:
            [job] = list(session.scalars(select(Job)))
            results = [(r.kind, r.sop_instance_uid, r.path)
                       for r in session.scalars(select(Result).where(Result.job_id == job.id))]
            job_state = job.state
        held = set(orthanc.sop_instance_uids())
        fetched: dict[str, list[Any]] = {}
        for kind, uid, _path in results:
            assert uid in held, (kind, "not in the PACS")
            [orthanc_id] = [i for i in orthanc.instance_ids()
                            if orthanc.get(f"/instances/{i}/simplified-tags")
                            .get("SOPInstanceUID") == uid]  # type: ignore[attr-defined]
            copy = orthanc.download(orthanc_id, tmp_path / f"{kind}-{uid}.dcm")
            assert errors(dciodvfy(copy)) == [], (kind, dciodvfy(copy))
            fetched.setdefault(kind, []).append(pydicom.dcmread(copy))
    finally:
        database.dispose()
        orthanc.stop()

    assert job_state == "done"
    assert len(fetched["seg"]) == 2 and len(fetched["overlay"]) == 2
    [sr] = fetched["sr"]
    codes = _codes(sr)
    grades = [value for name, value in codes if name == DR_GRADE]
    # One grade per eye, and the study summary's worse eye once more.
    assert len(grades) == 3 and set(grades) <= set(GRADE_CODES), codes
    worst = max(grades, key=GRADE_CODES.index)
    [summary] = [i for i in content_items(sr.ContentSequence)
                 if str(i.ConceptNameCodeSequence[0].CodeValue) == SUMMARY]
    summary_codes = _codes(summary)
    assert (DR_GRADE, worst) in summary_codes, summary_codes
    for flag in (REFERABLE_DR, REFERABLE_DME):
        values = [value for name, value in codes if name == flag]
        assert len(values) == 3 and set(values) <= YES_NO, (flag, codes)
        assert {v for n, v in summary_codes if n == flag} == (
            {"373066001"} if "373066001" in values else {"373067005"})
    # Each eye's SEG carries the three lesion segments beside the vessels and the disc.
    for seg in fetched["seg"]:
        labels = {str(s.SegmentLabel) for s in seg.SegmentSequence}
        assert {"Haemorrhages", "Hard exudates", "Soft exudates"} <= labels, labels

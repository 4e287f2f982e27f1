"""Each shipped preset, with the shipped models, end to end on the demo study.

storescu sends the synthetic two-eye study to a real `dicomnode serve` that loads the shipped
`model_registry/` and `presets/`; the demo study's description matches no preset's
conditions, so the modality default (set per run) picks the preset under test. The job must
end `done` with every model of the preset's graph run on both images, and the SR and SEGs
must reach Orthanc and pass dciodvfy.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Job, ModelRun, Result
from dicomnode.graph import Selection, resolve
from dicomnode.registry.loader import load_registry
from dicomnode.routing import load_presets
from dicomnode.synthetic import demo_study
from tests.support.node import NODE_AE, NodeProcess, wait_until_delivered, write_config
from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port, require_tool
from tests.unit.results.sources import content_items, dciodvfy, errors

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ["diabetic-screening", "ophthalmology-comprehensive", "glaucoma-clinic",
           "vascular-health-check"]
SPACING = 0.008  # mm per pixel, written into the demo study's Pixel Spacing
PIXEL_TO_MM = {"{px}": ("mm", SPACING), "{px2}": ("mm2", SPACING * SPACING)}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("pacs"), free_port(), free_port())
    peer.start()
    yield peer
    peer.stop()


def _expected_models(preset_id: str) -> dict[str, str]:
    registry = load_registry(ROOT / "model_registry")
    presets = load_presets(ROOT / "presets", registry=registry, destinations={"pacs"})
    preset = next(p for p in presets.ordered() if p.id == preset_id)
    graph = resolve(Selection.of(preset.models, modality="OP", preset=preset_id), registry)
    return dict(graph.models)


@pytest.mark.parametrize("preset_id", PRESETS)
def test_shipped_preset_runs_on_the_demo_study_and_reaches_the_pacs(
    tmp_path: Path, orthanc: Orthanc, preset_id: str
) -> None:
    require_tool("dciodvfy", "dicom3tools")
    storescu = require_tool("storescu", "dcmtk")
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    config = write_config(
        tmp_path, db_url,
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        registry={"path": str(ROOT / "model_registry")},
        presets={"path": str(ROOT / "presets")},
        modality_defaults={"OP": preset_id},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.5},
        dispatch={"first_delay_seconds": 0.5, "poll_seconds": 0.2},
    )
    study = demo_study(tmp_path / "demo", size=768, seed=7, pixel_spacing=(SPACING, SPACING))
    database = Database(db_url)
    try:
        with NodeProcess(config) as node:
            subprocess.run([storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1",
                            str(node.port), *map(str, study)],
                           check=True, capture_output=True, timeout=120)
            wait_until_delivered(database, node, timeout=240, poll=0.5)
        with database.transaction() as session:
            [job] = list(session.scalars(select(Job)))
            runs = list(session.scalars(select(ModelRun).where(ModelRun.job_id == job.id)))
            results = list(session.scalars(select(Result).where(Result.job_id == job.id)))
            job_state, job_preset = job.state, job.preset
    finally:
        database.dispose()

    assert (job_preset, job_state) == (preset_id, "done")
    expected = _expected_models(preset_id)
    assert {(r.model_id, r.version) for r in runs} == set(expected.items())
    assert len(runs) == len(expected)  # one run per model: a shared upstream runs once
    if preset_id == "diabetic-screening":  # the grading models read one lesion-seg's maps
        assert "lesion-seg" in expected and "dr-grade" in expected
    assert all(r.status == "ok" and r.images == 2 for r in runs), [
        (r.model_id, r.status, r.images, r.error) for r in runs]
    kinds = sorted(r.kind for r in results)
    assert kinds.count("sr") == 1
    # Every shipped preset holds a mask model (vessels or disc): one SEG per eye.
    assert kinds.count("seg") == 2
    held = set(orthanc.sop_instance_uids())
    for row in results:
        assert row.sop_instance_uid in held, (row.kind, "not in the PACS")
        path = tmp_path / "storage" / row.path
        assert errors(dciodvfy(path)) == [], (row.kind, dciodvfy(path))
    [sr_row] = [r for r in results if r.kind == "sr"]
    _check_sizes_in_pixels_and_mm(tmp_path / "storage" / sr_row.path, expected)


def _check_sizes_in_pixels_and_mm(sr_path: Path, models: dict[str, str]) -> None:
    """Every size in source pixels has its mm twin at the demo study's Pixel Spacing."""
    numbers: list[tuple[str, str, float]] = [
        (str(item.ConceptNameCodeSequence[0].CodeValue),
         str(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue),
         float(item.MeasuredValueSequence[0].NumericValue))
        for item in content_items(pydicom.dcmread(sr_path).ContentSequence)
        if item.ValueType == "NUM"]
    in_pixels = [n for n in numbers if n[1] in PIXEL_TO_MM]
    sizes_expected = bool({"disc-metrics", "vessel-metrics"} & set(models))
    assert bool(in_pixels) == sizes_expected, numbers
    for concept, unit, value in in_pixels:
        mm_unit, factor = PIXEL_TO_MM[unit]
        twins = [v for c, u, v in numbers if c == concept and u == mm_unit]
        assert any(v == pytest.approx(value * factor, rel=1e-6) for v in twins), (
            concept, unit, value, numbers)


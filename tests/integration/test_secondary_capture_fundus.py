"""A Secondary Capture fundus photograph (Modality OT, older cameras and frame grabbers) is
routed by the shipped configuration's `modality_defaults.OT`, analysed by the shipped models
like an OP image, and its SR reaches the PACS.

storescu is the camera, a real `dicomnode serve` with the shipped model registry, presets and
modality defaults is the node, Orthanc is the PACS. Two images: one made in code (uncompressed)
and, where ../shared/data holds it, the real NEMA WG04 VL4 fundus photograph (Secondary
Capture, JPEG 2000 lossy, sent with storescu's matching proposal -xw).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Delivery, Job, ModelRun, Result, Study
from tests.support.node import NODE_AE, NodeProcess, results_delivered, write_config
from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port, require_tool
from tests.unit.results.sources import dciodvfy, errors, source_image

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VL4 = ROOT.parent / "shared" / "data" / "dicom-samples" / "NEMA_WG04" / "J2KI" / "VL4_J2KI"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("pacs"), free_port(), free_port())
    peer.start()
    yield peer
    peer.stop()


def _made_in_code(folder: Path) -> tuple[Path, list[str]]:
    source, _, _ = source_image("sc", laterality="R", size=512, seed=3)
    assert (source.Modality, source.SOPClassUID) == ("OT", "1.2.840.10008.5.1.4.1.1.7")
    path = folder / "sc.dcm"
    source.save_as(path, enforce_file_format=True)
    return path, []


def _nema_vl4(folder: Path) -> tuple[Path, list[str]]:
    if not VL4.is_file():
        pytest.skip(f"real data not present: {VL4} (../shared/data/SOURCES.md)")
    return VL4, ["-xw"]  # JPEG 2000 (lossy): storescu does not transcode


@pytest.mark.parametrize("make", [_made_in_code, _nema_vl4], ids=["made-in-code", "nema-vl4"])
def test_secondary_capture_fundus_is_analysed_and_reported(
    tmp_path: Path, orthanc: Orthanc, make: object
) -> None:
    storescu = require_tool("storescu", "dcmtk")
    require_tool("dciodvfy", "dicom3tools")
    path, proposal = make(tmp_path)  # type: ignore[operator]
    shipped = yaml.safe_load((ROOT / "config" / "dicomnode.yaml").read_text(encoding="utf-8"))
    assert "OT" in shipped["modality_defaults"], "the shipped config routes OT studies"
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    config = write_config(
        tmp_path, db_url,
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        registry={"path": str(ROOT / "model_registry")},
        presets={"path": str(ROOT / "presets")},
        modality_defaults=shipped["modality_defaults"],
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.5},
        dispatch={"first_delay_seconds": 0.5, "poll_seconds": 0.2},
    )
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    database = Database(db_url)
    try:
        with NodeProcess(config) as node:
            subprocess.run([storescu, "-aet", "CAM1", "-aec", NODE_AE, *proposal, "127.0.0.1",
                            str(node.port), str(path)],
                           check=True, capture_output=True, timeout=120)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                with database.transaction() as session:
                    deliveries = list(session.scalars(select(Delivery)))
                    state = session.scalar(select(Study.state)
                                           .where(Study.study_uid == study_uid))
                if state in ("failed", "not-routed"):
                    pytest.fail(f"study {state}; node log:\n{node.log()[-6000:]}")
                with database.transaction() as session:
                    if deliveries and results_delivered(session):
                        break
                time.sleep(0.5)
            else:
                pytest.fail(f"results not delivered; node log:\n{node.log()[-6000:]}")
        with database.transaction() as session:
            [job] = list(session.scalars(select(Job)))
            runs = list(session.scalars(select(ModelRun).where(ModelRun.job_id == job.id)))
            results = list(session.scalars(select(Result).where(Result.job_id == job.id)))
            job_state, job_preset = job.state, job.preset
    finally:
        database.dispose()
    assert (job_preset, job_state) == (shipped["modality_defaults"]["OT"], "done")
    assert runs and all(r.status in ("ok", "skipped") for r in runs), [
        (r.model_id, r.status, r.error) for r in runs]
    assert any(r.model_id == "fundus-quality" and r.status == "ok" for r in runs)
    [sr] = [r for r in results if r.kind == "sr"]
    assert sr.sop_instance_uid in set(orthanc.sop_instance_uids())
    sr_path = tmp_path / "storage" / sr.path
    assert errors(dciodvfy(sr_path)) == [], dciodvfy(sr_path)
    assert pydicom.dcmread(sr_path).StudyInstanceUID == study_uid

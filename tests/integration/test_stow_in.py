"""DICOMweb in and out, end to end: a gateway sends the demo study by STOW-RS (dicomweb-client)
to `POST /dicomweb/studies` of a real `dicomnode serve`; the study is stored byte for byte,
completes (both eyes), is routed to a preset of fixture models, and its results go to Orthanc
over STOW-RS (a `dicomweb` destination with basic authentication). A malformed part fails on
its own with a Failure Reason; tokens decide who may send."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import requests
import yaml
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Instance, Result, Study
from dicomnode.synthetic import demo_study
from dicomnode.web import auth
from tests.support.dicom_files import dataset_bytes, write_op
from tests.support.node import NodeProcess, results_delivered, write_config
from tests.support.onnx_models import (
    RegistryWriter,
    classifier_manifest,
    green_threshold_segmenter,
    segmenter_manifest,
)
from tests.support.orthanc import Orthanc
from tests.support.peers import free_port

pytestmark = pytest.mark.integration

PACS_USER, PACS_PASSWORD = "node", "pacs-password-1"
PRESET = {
    "id": "web-screening", "name": "Screening over DICOMweb", "audience": "tests",
    "description": "STOW-RS in, STOW-RS out",
    "models": ["vessel-seg", "image-quality"],
    "outputs": {"sr": True, "seg": True, "overlay": False},
    "destinations": ["cloud"],
    # The gateway's user name is the calling AE title of what it sends.
    "routing": {"modality": ["OP"], "calling_ae": ["gateway"]},
}
BOUNDARY = "stow-test-boundary"


def _config(tmp_path: Path, orthanc: Orthanc, web_port: int) -> Path:
    writer = RegistryWriter(tmp_path / "registry")
    writer.add(segmenter_manifest("vessel-seg", modalities=("OP",)),
               green_threshold_segmenter(threshold=0.3))
    writer.add(classifier_manifest("image-quality", gate=False, modalities=("OP",)))
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "web.yaml").write_text(yaml.safe_dump(PRESET), encoding="utf-8")
    (tmp_path / "pacs-password").write_text(PACS_PASSWORD, encoding="utf-8")
    return write_config(
        tmp_path, f"sqlite:///{tmp_path / 'node.db'}",
        destinations={"cloud": {"type": "dicomweb", "url": orthanc.dicomweb_url,
                                "auth": {"basic": {"user": PACS_USER,
                                                   "password_file": "pacs-password"}}}},
        registry={"path": str(tmp_path / "registry")},
        presets={"path": str(presets)},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.5},
        dispatch={"first_delay_seconds": 0.5, "poll_seconds": 0.2},
        web={"enabled": True, "host": "127.0.0.1", "port": web_port},
    )


def _wait(what: str, predicate: Callable[[], bool], node: NodeProcess,
          timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; node log:\n{node.log()[-6000:]}")


def _client(base: str, token: str) -> DICOMwebClient:
    client = DICOMwebClient(f"{base}/dicomweb", headers={"Authorization": f"Bearer {token}"})
    client.set_http_retry_params(retry=False)
    return client


def _multipart(parts: list[bytes]) -> bytes:
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + part + b"\r\n" for part in parts)
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


def _post(base: str, body: bytes, token: str | None) -> requests.Response:
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                               f'boundary="{BOUNDARY}"'}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{base}/dicomweb/studies", data=body, headers=headers, timeout=30)


def _study_state(database: Database, study_uid: str) -> str | None:
    with database.transaction() as session:
        return session.scalar(select(Study.state).where(Study.study_uid == study_uid))


def test_stow_rs_in_stores_routes_and_delivers_over_stow_rs_out(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(), dicomweb=True,
                      users={PACS_USER: PACS_PASSWORD})
    orthanc.start()
    web_port = free_port()
    config = _config(tmp_path, orthanc, web_port)
    database = open_database(f"sqlite:///{tmp_path / 'node.db'}")
    auth.add_user(database, "gateway", "sender", "sender-password-1")
    auth.add_user(database, "victor", "viewer", "viewer-password-1")
    sender, viewer = auth.issue_token(database, "gateway"), auth.issue_token(database, "victor")
    base = f"http://127.0.0.1:{web_port}"
    try:
        with NodeProcess(config) as node:
            files = demo_study(tmp_path / "demo", size=128)
            datasets = [pydicom.dcmread(p) for p in files]
            study_uid = str(datasets[0].StudyInstanceUID)

            # Who may send: no token 401, a viewer 403; a sender sees nothing else.
            assert _post(base, _multipart([files[0].read_bytes()]), None).status_code == 401
            assert _post(base, _multipart([files[0].read_bytes()]), viewer).status_code == 403
            assert requests.get(f"{base}/api/studies", timeout=10, headers={
                "Authorization": f"Bearer {sender}"}).status_code == 403
            assert _study_state(database, study_uid) is None

            answer = _client(base, sender).store_instances(datasets)
            stored = sorted(str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence)
            assert stored == sorted(str(ds.SOPInstanceUID) for ds in datasets)
            assert "FailedSOPSequence" not in answer
            # "Stored" is the C-STORE promise: the row is there, the data set byte for byte.
            with database.transaction() as session:
                rows = {i.sop_instance_uid: (i.path, i.calling_ae)
                        for i in session.scalars(select(Instance))}
            for path in files:
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                relative, calling = rows[uid]
                assert calling == "gateway"
                assert dataset_bytes(node.storage / relative) == dataset_bytes(path)

            _wait("the study processed", lambda: _study_state(database, study_uid) == "done",
                  node)

            def delivered() -> bool:
                with database.transaction() as session:
                    return results_delivered(session)

            _wait("results delivered over STOW-RS", delivered, node)
            with database.transaction() as session:
                results = sorted(session.scalars(select(Result.sop_instance_uid)))
            assert sorted(orthanc.sop_instance_uids()) == results

            # One good part, one that is not DICOM, one truncated: the good one is stored.
            good = write_op(tmp_path / "good.dcm", laterality="R")
            truncated = write_op(tmp_path / "cut.dcm", laterality="L").read_bytes()[:600]
            response = _post(base, _multipart([good.read_bytes(), b"not a DICOM file",
                                               truncated]), sender)
            assert response.status_code == 202, response.text
            reply = pydicom.Dataset.from_json(response.json())
            good_uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
            assert [str(i.ReferencedSOPInstanceUID) for i in reply.ReferencedSOPSequence] == [
                good_uid]
            assert [int(i.FailureReason) for i in reply.FailedSOPSequence] == [0xC000, 0xC210]
            with database.transaction() as session:
                assert session.scalar(select(Instance.id).where(
                    Instance.sop_instance_uid == good_uid)) is not None
                refusals = list(session.scalars(select(AuditEvent.detail).where(
                    AuditEvent.kind == "refused", AuditEvent.calling_ae == "gateway")))
            assert len(refusals) == 2 and all(r and r.startswith("STOW-RS: ")
                                              for r in refusals), refusals
    finally:
        database.dispose()
        orthanc.stop()

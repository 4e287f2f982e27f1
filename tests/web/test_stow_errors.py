"""STOW-RS answers that need no peer: who may send, which bodies are refused before anything is
stored, and per-part Failure Reasons for transfer syntaxes and SOP classes the node refuses."""

from __future__ import annotations

from pathlib import Path

import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from dicomnode.db.models import Instance
from dicomnode.web import auth
from dicomnode.web.app import create_app
from tests.support.dicom_files import write_op
from tests.web.conftest import Env, make_env

TYPE = 'multipart/related; type="application/dicom"; boundary=B'


def _body(*parts: bytes) -> bytes:
    return b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--B--\r\n"


def _sender(env: Env) -> dict[str, str]:
    auth.add_user(env.database, "gateway", "sender", "sender-password-1")
    return {"Authorization": f"Bearer {auth.issue_token(env.database, 'gateway')}"}


def _instances(env: Env) -> int:
    with env.database.transaction() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def test_roles_and_bodies(client: TestClient, env: Env, viewer: dict[str, str],
                          tmp_path: Path) -> None:
    sender = _sender(env)
    good = write_op(tmp_path / "r.dcm").read_bytes()
    assert client.post("/dicomweb/studies", content=_body(good),
                       headers={"Content-Type": TYPE}).status_code == 401
    assert client.post("/dicomweb/studies", content=_body(good),
                       headers={"Content-Type": TYPE, **viewer}).status_code == 403
    # A sender's token opens nothing but STOW-RS.
    assert client.get("/api/presets", headers=sender).status_code == 403
    assert client.post("/dicomweb/studies", content=good,
                       headers={"Content-Type": "application/dicom", **sender}
                       ).status_code == 415
    assert client.post("/dicomweb/studies", content=b"--B\r\nContent-Type: application/dicom"
                       b"\r\n\r\nno end", headers={"Content-Type": TYPE, **sender}
                       ).status_code == 400
    assert _instances(env) == 0


def test_unsupported_syntax_and_class_fail_per_part(
    client: TestClient, env: Env, tmp_path: Path
) -> None:
    sender = _sender(env)
    deflated = write_op(tmp_path / "d.dcm")
    ds = pydicom.dcmread(deflated)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated)
    ct = write_op(tmp_path / "ct.dcm")
    ds = pydicom.dcmread(ct)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(ct)
    response = client.post("/dicomweb/studies",
                           content=_body(deflated.read_bytes(), ct.read_bytes()),
                           headers={"Content-Type": TYPE, **sender})
    assert response.status_code == 409  # none stored
    assert response.headers["content-type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(response.json())
    assert [int(i.FailureReason) for i in answer.FailedSOPSequence] == [0xC122, 0x0122]
    assert "ReferencedSOPSequence" not in answer
    assert _instances(env) == 0


def test_request_over_the_size_limit_is_refused_unstored(tmp_path: Path) -> None:
    env = make_env(tmp_path / "node", web={"port": 0, "stow_max_request_mb": 1})
    try:
        sender = _sender(env)
        small = write_op(tmp_path / "small.dcm").read_bytes()
        assert len(small) < 1024 * 1024
        big = _body(*[small] * (2 * 1024 * 1024 // len(small) + 1))
        with TestClient(create_app(env.state)) as client:
            declared = client.post("/dicomweb/studies", content=big,
                                   headers={"Content-Type": TYPE, **sender})
            assert declared.status_code == 413
            assert "stow_max_request_mb" in declared.json()["detail"]
            # Chunked (no Content-Length): refused while it is read.
            streamed = client.post("/dicomweb/studies", content=iter([big[:700_000]] * 3),
                                   headers={"Content-Type": TYPE, **sender})
            assert streamed.status_code == 413
            assert _instances(env) == 0
            # Under the limit the same parts are stored.
            assert client.post("/dicomweb/studies", content=_body(small),
                               headers={"Content-Type": TYPE, **sender}).status_code == 200
            assert _instances(env) == 1
    finally:
        env.database.dispose()

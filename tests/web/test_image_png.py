"""The image PNG endpoint answers a malformed stored image with a clear 422, never a 500."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dicomnode.db.models import Instance
from tests.support.dicom_files import dataset_bytes
from tests.support.executor_fixtures import add_study
from tests.support.mutate import put
from tests.web.conftest import Env


def _stored(env: Env, sop_uid: str) -> Path:
    with env.database.transaction() as session:
        rel = session.scalars(select(Instance.path)
                              .where(Instance.sop_instance_uid == sop_uid)).one()
    return env.settings.storage.path / rel


@pytest.mark.parametrize(("tag", "vr", "value"), [
    (0x00280008, "IS", b"many"),  # Number of Frames that is not a number
    (0x00280101, "US", b"\x08\x00\x00"),  # Bits Stored of 3 bytes
    (0x00280010, "US", b"\xff\x7f"),  # Rows far beyond the pixel data
])
def test_a_malformed_stored_image_is_a_422_with_a_reason(
    env: Env, client: TestClient, admin: dict[str, str], tag: int, vr: str, value: bytes
) -> None:
    env.settings.storage.path.mkdir(parents=True, exist_ok=True)
    study_uid, sops = add_study(env.database, env.settings.storage.path, [200, 200])
    good = client.get(f"/api/studies/{study_uid}/images/{sops[0]}.png", headers=admin)
    assert good.status_code == 200 and good.headers["content-type"] == "image/png"
    path = _stored(env, sops[1])
    raw = path.read_bytes()
    body = dataset_bytes(path)
    path.write_bytes(raw[: len(raw) - len(body)] + put(body, tag, vr, value))
    bad = client.get(f"/api/studies/{study_uid}/images/{sops[1]}.png", headers=admin)
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"]
    # The other image of the study is still shown.
    assert client.get(f"/api/studies/{study_uid}/images/{sops[0]}.png",
                      headers=admin).status_code == 200

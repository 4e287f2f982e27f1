"""The operator's study list: columns (patient ID, study date, station, preset, state,
delivery), filters (state, study date range, patient ID, preset), paging; a study's deliveries
named per object; one time format (ISO 8601 UTC with Z) in the API, the CLI and the console."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from dicomnode.assemble.studies import list_studies
from dicomnode.cli import main
from dicomnode.db.audit import record
from dicomnode.db.models import Delivery, Job, Result, Study
from dicomnode.receive.identifiers import read_identifiers
from tests.support.executor_fixtures import add_study
from tests.web.conftest import Env

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TIME_KEYS = re.compile(r"(_at|^at)$")


def _make(env: Env, patient: str, study_date: str, state: str, preset: str | None,
          station: str = "FUNDUS-1") -> str:
    uid, _ = add_study(env.database, env.settings.storage.path, [200], state=state)
    with env.database.transaction() as session:
        session.execute(update(Study).where(Study.study_uid == uid).values(
            patient_id=patient, study_date=study_date, station_name=station))
        if preset is not None:
            study_id = session.scalar(select(Study.id).where(Study.study_uid == uid))
            session.add(Job(study_id=study_id, study_uid=uid, preset="old", graph_json="{}",
                            state="done", reason="complete"))
            session.add(Job(study_id=study_id, study_uid=uid, preset=preset, graph_json="{}",
                            state="done", reason="rerun"))
    return uid


@pytest.fixture
def studies(env: Env) -> dict[str, str]:
    return {
        "a": _make(env, "P1", "20261101", "done", "screening"),
        "b": _make(env, "P2", "20261115", "failed", "centres", station="FUNDUS-2"),
        "c": _make(env, "P1", "20261130", "done", "centres"),
        "d": _make(env, "P3", "20261201", "receiving", None),
    }


def _uids(client: TestClient, headers: dict[str, str], **query: Any) -> list[str]:
    res = client.get("/api/studies", headers=headers, params=query)
    assert res.status_code == 200, res.json()
    return [s["study_uid"] for s in res.json()["studies"]]


def test_filters_and_paging(client: TestClient, viewer: dict[str, str],
                            studies: dict[str, str]) -> None:
    a, b, c, d = (studies[k] for k in "abcd")
    assert _uids(client, viewer) == [d, c, b, a]  # newest first
    assert _uids(client, viewer, study_state="done") == [c, a]
    assert _uids(client, viewer, patient_id="P1") == [c, a]
    assert _uids(client, viewer, date_from="2026-11-15") == [d, c, b]
    assert _uids(client, viewer, date_from="2026-11-02", date_to="20261130") == [c, b]
    assert _uids(client, viewer, preset="centres") == [c, b]  # the latest job's preset
    assert _uids(client, viewer, preset="old") == []
    assert _uids(client, viewer, preset="centres", study_state="failed") == [b]
    page = client.get("/api/studies", headers=viewer, params={"limit": 2, "offset": 2}).json()
    assert [s["study_uid"] for s in page["studies"]] == [b, a]
    assert (page["total"], page["limit"], page["offset"]) == (4, 2, 2)
    assert client.get("/api/studies", headers=viewer,
                      params={"patient_id": "P1", "limit": 1}).json()["total"] == 2
    row = client.get("/api/studies", headers=viewer, params={"study_state": "failed"}
                     ).json()["studies"][0]
    assert (row["patient_id"], row["study_date"], row["station_name"], row["preset"],
            row["state"]) == ("P2", "2026-11-15", "FUNDUS-2", "centres", "failed")
    assert "delivery" in row
    bad = client.get("/api/studies", headers=viewer, params={"date_from": "15.11.2026"})
    assert bad.status_code == 422 and "date_from" in bad.json()["detail"]


def test_cli_filters_and_pages(env: Env, studies: dict[str, str], capsys: Any) -> None:
    config = str(env.root / "dicomnode.yaml")
    assert main(["studies", "--patient", "P1", "--json", "--config", config]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["study_uid"] for r in rows] == [studies["c"], studies["a"]]
    assert all(ISO_Z.match(r["created_at"]) for r in rows)
    assert main(["studies", "--from", "2026-11-15", "--limit", "1", "--offset", "1",
                 "--config", config]) == 0
    out = capsys.readouterr().out
    assert studies["c"] in out and studies["d"] not in out and "studies 2-2 of 3" in out
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out)
    assert main(["studies", "--to", "yesterday", "--config", config]) == 2


def _times(value: Any, key: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _times(v, k)]
    if isinstance(value, list):
        return [t for v in value for t in _times(v, key)]
    return [(key, value)] if TIME_KEYS.search(key) and value is not None else []


def test_one_time_format_and_named_deliveries(
    client: TestClient, admin: dict[str, str], env: Env, studies: dict[str, str],
) -> None:
    uid = studies["c"]
    source = client.get(f"/api/studies/{uid}", headers=admin).json()["images"][0]
    with env.database.transaction() as session:
        job_id = session.scalar(select(Job.id).where(Job.study_uid == uid)
                                .order_by(Job.id.desc()))
        for n, (kind, src) in enumerate((("sr", None), ("seg", source["sop_instance_uid"]),
                                         ("overlay", source["sop_instance_uid"]))):
            sop = f"1.2.826.0.1.3680043.8.498.77{n}"
            session.add(Result(job_id=job_id, study_uid=uid, kind=kind, sop_instance_uid=sop,
                               sop_class_uid="1.2", series_instance_uid="1.2.3",
                               source_uid=src, path=f"r{n}.dcm"))
            session.add(Delivery(path=f"r{n}.dcm", sop_instance_uid=sop, sop_class_uid="1.2",
                                 study_uid=uid, destination="pacs"))
        record(session, "study-complete", actor="test", study_uid=uid)
    detail = client.get(f"/api/studies/{uid}", headers=admin).json()
    assert [d["object"] for d in detail["deliveries"]] == [
        f"SR (job {job_id})", f"SEG of image 1 (R) (job {job_id})",
        f"overlay of image 1 (R) (job {job_id})"]
    for payload in (detail, client.get("/api/studies", headers=admin).json(),
                    client.get("/api/users", headers=admin).json(),
                    client.get("/api/audit/presets", headers=admin).json()):
        found = _times(payload)
        bad = [(k, v) for k, v in found if not ISO_Z.match(str(v))]
        assert bad == []
    assert {k for k, _ in _times(detail)} >= {"created_at", "updated_at", "received_at", "at",
                                              "next_attempt_at"}
    page = client.get(f"/studies/{uid}", headers=admin)
    assert page.status_code == 200
    assert "SEG of image 1 (R)" in page.text
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", page.text)
    assert not re.search(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?\+00:00", page.text)


def test_study_date_and_station_are_read_at_receive() -> None:
    from pydicom.uid import generate_uid

    from dicomnode.synthetic import op_dataset
    from tests.support.executor_fixtures import disc_rgb
    from tests.unit.test_receive_identifiers import _encode

    ds = op_dataset(disc_rgb(), laterality="R", study_uid=generate_uid(),
                    series_uid=generate_uid(), instance_number=1)
    ids = read_identifiers(_encode(ds), implicit_vr=False,
                           command_sop_class_uid=str(ds.SOPClassUID),
                           command_sop_instance_uid=str(ds.SOPInstanceUID))
    assert ids.study_date == str(ds.StudyDate) and ids.station_name == str(ds.StationName)


def test_receive_records_study_date_and_station(env: Env) -> None:
    from pydicom.uid import generate_uid

    from dicomnode.receive.identifiers import Identifiers
    from dicomnode.receive.ingest import Arrival, record_arrival

    uid = generate_uid()
    ids = Identifiers(study_uid=uid, series_uid=generate_uid(), sop_instance_uid=generate_uid(),
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.5.1", patient_id="P9",
                      modality="OP", laterality="R", study_date="20261124",
                      station_name="FUNDUS-ROOM-3")
    record_arrival(env.database, Arrival(ids, "1.2.840.10008.1.2.1", "x.dcm", 1, "CAM1",
                                         "DICOMNODE", "127.0.0.1"), quiet_seconds=600)
    page = list_studies(env.database)
    [row] = [r for r in page.rows if r.study_uid == uid]
    assert (row.study_date, row.station_name, row.patient_id) == (
        "2026-11-24", "FUNDUS-ROOM-3", "P9")


def test_console_studies_page_filters_and_pages(
    client: TestClient, viewer: dict[str, str], studies: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicomnode.web import console

    page = client.get("/studies", headers=viewer, params={"patient_id": "P1"}).text
    assert studies["a"] in page and studies["c"] in page and studies["b"] not in page
    assert "Studies 1-2 of 2" in page
    monkeypatch.setattr(console, "STUDIES_PER_PAGE", 3)
    first = client.get("/studies", headers=viewer).text
    assert studies["a"] not in first and 'id="page-next"' in first
    second = client.get("/studies", headers=viewer, params={"offset": 3}).text
    assert studies["a"] in second and studies["d"] not in second and "Studies 4-4 of 4" in second

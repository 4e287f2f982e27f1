"""The study page's `current` flag: the objects of the latest encoded result set, those it made
and those of an earlier job it kept, and no SEG the latest run no longer makes."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from dicomnode.db.models import Job, Result, ResultSet, Study
from tests.web.conftest import Env


def _job(env: Env, study_id: int, uid: str, objects: list[tuple[str, str, str | None]],
         members: list[str] | None) -> None:
    """A done job whose result set is encoded, with Result rows for `objects` (kind, SOP
    Instance UID, source image) and `members` as the pipeline records them (None: a set
    encoded before migration 13)."""
    with env.database.transaction() as session:
        job = Job(study_id=study_id, study_uid=uid, preset="screening", graph_json="{}",
                  state="done", output_path=f"jobs/{uid}")
        session.add(job)
        session.flush()
        session.add(ResultSet(job_id=job.id, study_uid=uid, state="encoded", attempts=1,
                              objects_json=None if members is None else json.dumps(members)))
        for kind, sop, source in objects:
            session.add(Result(job_id=job.id, study_uid=uid, kind=kind, sop_instance_uid=sop,
                               sop_class_uid="1.2", series_instance_uid=f"{uid}.8",
                               source_uid=source, path=f"results/{sop}.dcm"))


def _study(env: Env, uid: str) -> int:
    with env.database.transaction() as session:
        study = Study(study_uid=uid, state="done", calling_ae="CAM1")
        session.add(study)
        session.flush()
        return study.id


def _current(client: TestClient, viewer: dict[str, str], uid: str) -> dict[str, bool]:
    detail = client.get(f"/api/studies/{uid}", headers=viewer).json()
    return {r["sop_instance_uid"]: r["current"] for r in detail["results"]}


def test_a_seg_the_latest_run_no_longer_makes_is_not_current(
        client: TestClient, env: Env, viewer: dict[str, str]) -> None:
    study = _study(env, "1.7")
    _job(env, study, "1.7", [("sr", "sr1", None), ("seg", "segA1", "imgA"),
                             ("seg", "segB1", "imgB")], ["sr1", "segA1", "segB1"])
    # The re-run keeps image A's SEG (unchanged) and makes none for image B.
    _job(env, study, "1.7", [("sr", "sr2", None)], ["sr2", "segA1"])
    assert _current(client, viewer, "1.7") == {
        "sr1": False, "segA1": True, "segB1": False, "sr2": True}


def test_sets_encoded_before_the_record_fall_back_to_the_latest_per_image(
        client: TestClient, env: Env, viewer: dict[str, str]) -> None:
    study = _study(env, "1.8")
    _job(env, study, "1.8", [("sr", "sr1", None), ("seg", "segA1", "imgA"),
                             ("seg", "segB1", "imgB")], None)
    _job(env, study, "1.8", [("sr", "sr2", None), ("seg", "segA2", "imgA")], None)
    assert _current(client, viewer, "1.8") == {
        "sr1": False, "segA1": False, "segB1": True, "sr2": True, "segA2": True}

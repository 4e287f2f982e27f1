"""Re-running a received study: API (admin only, audited), CLI, refusals."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from dicomnode.cli import main
from dicomnode.db.models import AuditEvent, Job, Study
from tests.support.executor_fixtures import add_study
from tests.web.conftest import Env


def _study(env: Env, state: str = "done") -> str:
    uid, _ = add_study(env.database, env.settings.storage.path, [200, 180], state=state)
    return uid


def _jobs(env: Env, uid: str) -> list[Job]:
    with env.database.transaction() as session:
        return list(session.scalars(select(Job).where(Job.study_uid == uid).order_by(Job.id)))


def _state(env: Env, uid: str) -> str:
    with env.database.transaction() as session:
        return str(session.scalar(select(Study.state).where(Study.study_uid == uid)))


def test_admin_reruns_with_a_custom_selection_and_it_is_audited(
    client: TestClient, admin: dict[str, str], viewer: dict[str, str], env: Env,
) -> None:
    uid = _study(env)
    url = f"/api/studies/{uid}/rerun"
    assert client.post(url, headers=viewer, json={"preset": "screening"}).status_code == 403
    assert _jobs(env, uid) == []
    res = client.post(url, headers=admin, json={
        "preset": "screening", "with": ["green-seg-alt"], "without": ["green-seg"]})
    assert res.status_code == 202, res.json()
    body = res.json()
    assert sorted(body["graph"]["models"]) == ["green-quality", "green-seg-alt",
                                               "mask-fraction"]
    [job] = _jobs(env, uid)
    assert (job.id, job.reason, job.state, job.preset) == (
        body["job_id"], "rerun", "queued", "screening")
    assert "green-seg-alt" in json.loads(job.graph_json)["models"]
    assert _state(env, uid) == "processing"
    with env.database.transaction() as session:
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.kind == "study-rerun"))
        assert event.actor == "alice" and event.study_uid == uid
        assert "preset screening --with green-seg-alt --without green-seg" in str(event.detail)
    # While it runs, a second re-run is refused and changes nothing.
    again = client.post(url, headers=admin, json={})
    assert again.status_code == 409 and "processing" in again.json()["detail"]
    assert len(_jobs(env, uid)) == 1


def test_rerun_refusals(client: TestClient, admin: dict[str, str], env: Env) -> None:
    uid = _study(env)
    url = f"/api/studies/{uid}/rerun"
    assert client.post("/api/studies/1.2.3/rerun", headers=admin, json={}).status_code == 404
    assert client.post(url, headers=admin, json={"preset": "nope"}).status_code == 404
    bad = client.post(url, headers=admin, json={"preset": "screening", "with": ["nope"]})
    assert bad.status_code == 422 and bad.json()["error"]["kind"] == "unknown"
    conflict = client.post(url, headers=admin, json={"preset": "centres",
                                                     "with": ["green-seg-alt"]})
    assert conflict.status_code == 422 and conflict.json()["error"]["kind"] == "conflict"
    assert _jobs(env, uid) == [] and _state(env, uid) == "done"
    receiving = _study(env, state="receiving")
    refused = client.post(f"/api/studies/{receiving}/rerun", headers=admin, json={})
    assert refused.status_code == 409
    # Without a preset and without an earlier job, routing picks one (CAM1 -> screening).
    routed = client.post(url, headers=admin, json={})
    assert routed.status_code == 202 and routed.json()["preset"] == "screening"


def test_cli_reruns_a_failed_study(env: Env, capsys: Any) -> None:
    uid = _study(env, state="failed")
    with env.database.transaction() as session:
        session.add(Job(study_id=session.scalar(select(Study.id).where(
            Study.study_uid == uid)), study_uid=uid, preset="centres", graph_json="{}",
            state="failed", reason="complete"))
    config = str(env.root / "dicomnode.yaml")
    assert main(["study", "rerun", uid, "--without", "mask-centre", "--with", "mask-fraction",
                 "--json", "--config", config]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "centres"  # the latest job's preset by default
    assert sorted(out["graph"]["models"]) == ["green-quality", "green-seg", "mask-fraction"]
    jobs = _jobs(env, uid)
    assert [j.reason for j in jobs] == ["complete", "rerun"]
    with env.database.transaction() as session:
        actor = session.scalar(select(AuditEvent.actor).where(AuditEvent.kind == "study-rerun"))
    assert str(actor).startswith("cli:")
    # Processing now: the CLI refuses with exit 2 and says why.
    assert main(["study", "rerun", uid, "--config", config]) == 2
    assert "processing" in capsys.readouterr().err
    with env.database.transaction() as session:
        session.execute(update(Study).where(Study.study_uid == uid).values(state="done"))
    assert main(["study", "rerun", "1.2.3.4", "--config", config]) == 2

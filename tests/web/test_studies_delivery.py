"""The studies list and study page show each study's delivery summary (API and console), and
an administrator retries a failed encoding (API, and the study page's button)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from dicomnode.db.models import AuditEvent, Delivery, Job, Result, ResultSet, Study, WebSession
from dicomnode.settings import ResultsSettings
from dicomnode.web.deps import CSRF_HEADER
from tests.web.conftest import ADMIN_PASSWORD, VIEWER_PASSWORD, Env

MAX_ATTEMPTS = 2  # settings results.max_attempts, set small below


def _small_limit(env: Env) -> None:
    """The node's settings with `results.max_attempts` = MAX_ATTEMPTS (the app reads them)."""
    env.state.settings = env.settings.model_copy(
        update={"results": ResultsSettings(max_attempts=MAX_ATTEMPTS)})


def _study(env: Env, uid: str, *, job: str | None, result_set: str | None = None,
           attempts: int = 1, deliveries: tuple[str, ...] = ()) -> int | None:
    """A study whose latest job reached the given point (rows as the pipeline and the
    dispatcher write them)."""
    with env.database.transaction() as session:
        study = Study(study_uid=uid, state="done" if job == "done" else "processing",
                      calling_ae="CAM1")
        session.add(study)
        session.flush()
        if job is None:
            return None
        row = Job(study_id=study.id, study_uid=uid, preset="screening", graph_json="{}",
                  state=job, output_path=f"jobs/{uid}" if job == "done" else None)
        session.add(row)
        session.flush()
        if result_set is not None:
            session.add(ResultSet(job_id=row.id, study_uid=uid, state=result_set,
                                  attempts=attempts,
                                  error="OSError: disk full" if result_set == "failed" else None))
        for n, state in enumerate(deliveries):
            sop = f"{uid}.9.{n}"
            session.add(Result(job_id=row.id, study_uid=uid, kind="seg", sop_instance_uid=sop,
                               sop_class_uid="1.2", series_instance_uid=f"{uid}.8",
                               path=f"results/{sop}.dcm"))
            session.add(Delivery(path=f"results/{sop}.dcm", sop_instance_uid=sop,
                                 sop_class_uid="1.2", study_uid=uid, destination="pacs",
                                 state=state, attempts=1))
        return row.id


def test_studies_show_the_delivery_word(client: TestClient, env: Env,
                                        viewer: dict[str, str]) -> None:
    _small_limit(env)
    _study(env, "1.1", job="running")
    _study(env, "1.2", job="done", result_set="encoded", deliveries=("sent", "pending"))
    _study(env, "1.3", job="done", result_set="encoded", deliveries=("sent", "sent"))
    _study(env, "1.4", job="done", result_set="failed", attempts=MAX_ATTEMPTS)
    _study(env, "1.5", job="done", result_set="encoded", deliveries=("sent", "failed"))
    _study(env, "1.6", job=None)
    _study(env, "1.7", job="done", result_set="failed", attempts=MAX_ATTEMPTS - 1)
    listed = client.get("/api/studies", headers=viewer).json()["studies"]
    words = {s["study_uid"]: (s["delivery"] or {}).get("state") for s in listed}
    # 1.7 failed once, and the pipeline will try again: waiting, not failed.
    assert words == {"1.1": "waiting", "1.2": "sending", "1.3": "delivered", "1.4": "failed",
                     "1.5": "failed", "1.6": None, "1.7": "waiting"}
    retrying = next(s["delivery"] for s in listed if s["study_uid"] == "1.7")
    assert (retrying["results"], retrying["attempts"], retrying["max_attempts"],
            retrying["last_error"]) == ("failed", MAX_ATTEMPTS - 1, MAX_ATTEMPTS,
                                        "OSError: disk full")
    sending = next(s["delivery"] for s in listed if s["study_uid"] == "1.2")
    assert (sending["results"], sending["sent"], sending["pending"], sending["failed"]) == (
        "encoded", 1, 1, 0)
    detail = client.get("/api/studies/1.4", headers=viewer).json()
    assert detail["delivery"]["state"] == "failed" and detail["delivery"]["results"] == "failed"

    response = client.post("/login", data={"username": "alice", "password": ADMIN_PASSWORD},
                           follow_redirects=False)
    assert response.status_code == 303
    page = client.get("/studies")
    assert page.status_code == 200 and "<th>Delivery</th>" in page.text
    for word in ("waiting", "sending", "delivered", "failed"):
        assert f'class="badge state-{word}"' in page.text, word
    assert "1/2" in page.text  # 1.2: one of two sent
    study = client.get("/studies/1.4")
    assert study.status_code == 200 and 'id="delivery"' in study.text
    assert "Encoding failed 2 of 2 time(s):" in study.text and "OSError: disk full" in study.text
    waiting = client.get("/studies/1.7")
    assert "state-waiting" in waiting.text and "OSError: disk full" in waiting.text
    assert "Encoding failed 1 of 2 time(s); the node tries again automatically" in waiting.text
    delivered = client.get("/studies/1.3")
    assert "state-delivered" in delivered.text and "2 sent, 0 pending, 0 failed" in delivered.text


def test_api_retry_of_a_failed_encoding(client: TestClient, env: Env, admin: dict[str, str],
                                        viewer: dict[str, str]) -> None:
    _small_limit(env)
    job_id = _study(env, "2.1", job="done", result_set="failed", attempts=MAX_ATTEMPTS)
    encoded = _study(env, "2.2", job="done", result_set="encoded", deliveries=("sent",))
    running = _study(env, "2.3", job="running")
    retry = f"/api/jobs/{job_id}/results/retry"
    assert client.post(retry).status_code == 401
    assert client.post(retry, headers=viewer).status_code == 403
    assert client.post("/api/jobs/999/results/retry", headers=admin).status_code == 404
    refused = client.post(f"/api/jobs/{encoded}/results/retry", headers=admin)
    assert refused.status_code == 409
    assert refused.json()["detail"] == (f"job {encoded}'s results are already encoded; it has "
                                        "no failed result set to retry")
    refused = client.post(f"/api/jobs/{running}/results/retry", headers=admin)
    assert refused.status_code == 409 and "is running with no outputs" in refused.json()["detail"]

    ok = client.post(retry, headers=admin)
    assert ok.status_code == 200
    assert {k: ok.json()[k] for k in ("job_id", "study_uid", "state", "attempts")} == {
        "job_id": job_id, "study_uid": "2.1", "state": "pending", "attempts": 0}
    assert client.get("/api/studies/2.1", headers=viewer).json()["delivery"]["state"] == (
        "waiting")
    again = client.post(retry, headers=admin)
    assert again.status_code == 409 and "waiting to be encoded" in again.json()["detail"]
    with env.database.transaction() as session:
        actors = session.scalars(select(AuditEvent.actor).where(
            AuditEvent.kind == "results-retry")).all()
    assert actors == ["alice"]


def _login(client: TestClient, env: Env, name: str, password: str) -> str:
    response = client.post("/login", data={"username": name, "password": password},
                           follow_redirects=False)
    assert response.status_code == 303
    with env.database.transaction() as session:
        return session.scalars(select(WebSession.csrf_token)
                               .order_by(WebSession.id.desc())).first() or ""


def test_console_retry_button_for_admins_with_csrf(client: TestClient, env: Env) -> None:
    _small_limit(env)
    job_id = _study(env, "3.1", job="done", result_set="failed", attempts=MAX_ATTEMPTS)
    _study(env, "3.2", job="done", result_set="encoded", deliveries=("sent",))

    _login(client, env, "victor", VIEWER_PASSWORD)
    page = client.get("/studies/3.1")
    assert page.status_code == 200 and "Encoding failed" in page.text
    assert "Retry encoding" not in page.text and f"dicomnode results retry {job_id}" in page.text
    client.cookies.clear()

    csrf = _login(client, env, "alice", ADMIN_PASSWORD)
    page = client.get("/studies/3.1")
    assert 'class="retry-results secondary"' in page.text and "Retry encoding" in page.text
    assert f'data-job="{job_id}"' in page.text and f'data-csrf="{csrf}"' in page.text
    assert "Retry encoding" not in client.get("/studies/3.2").text  # nothing failed there

    # The button's POST, as study.js sends it: the session cookie alone is not enough.
    retry = f"/api/jobs/{job_id}/results/retry"
    no_token = client.post(retry)
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["detail"]
    assert client.post(retry, headers={CSRF_HEADER: "x" + csrf}).status_code == 403
    with env.database.transaction() as session:
        assert session.scalars(select(ResultSet.state)).all().count("failed") == 1
    ok = client.post(retry, headers={CSRF_HEADER: csrf})
    assert ok.status_code == 200 and ok.json()["state"] == "pending"
    with env.database.transaction() as session:
        [event] = session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "results-retry")).all()
    assert (event.actor, event.study_uid) == ("alice", "3.1")
    page = client.get("/studies/3.1")
    assert "Retry encoding" not in page.text and "state-waiting" in page.text

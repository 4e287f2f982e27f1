"""The studies list and study page show each study's delivery summary (API and console)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from dicomnode.db.models import Delivery, Job, Result, ResultSet, Study
from tests.web.conftest import ADMIN_PASSWORD, Env


def _study(env: Env, uid: str, *, job: str | None, result_set: str | None = None,
           deliveries: tuple[str, ...] = ()) -> None:
    """A study whose latest job reached the given point (rows as the pipeline and the
    dispatcher write them)."""
    with env.database.transaction() as session:
        study = Study(study_uid=uid, state="done" if job == "done" else "processing",
                      calling_ae="CAM1")
        session.add(study)
        session.flush()
        if job is None:
            return
        row = Job(study_id=study.id, study_uid=uid, preset="screening", graph_json="{}",
                  state=job, output_path=f"jobs/{uid}" if job == "done" else None)
        session.add(row)
        session.flush()
        if result_set is not None:
            session.add(ResultSet(job_id=row.id, study_uid=uid, state=result_set, attempts=1,
                                  error="OSError: disk full" if result_set == "failed" else None))
        for n, state in enumerate(deliveries):
            sop = f"{uid}.9.{n}"
            session.add(Result(job_id=row.id, study_uid=uid, kind="seg", sop_instance_uid=sop,
                               sop_class_uid="1.2", series_instance_uid=f"{uid}.8",
                               path=f"results/{sop}.dcm"))
            session.add(Delivery(path=f"results/{sop}.dcm", sop_instance_uid=sop,
                                 sop_class_uid="1.2", study_uid=uid, destination="pacs",
                                 state=state, attempts=1))


def test_studies_show_the_delivery_word(client: TestClient, env: Env,
                                        viewer: dict[str, str]) -> None:
    _study(env, "1.1", job="running")
    _study(env, "1.2", job="done", result_set="encoded", deliveries=("sent", "pending"))
    _study(env, "1.3", job="done", result_set="encoded", deliveries=("sent", "sent"))
    _study(env, "1.4", job="done", result_set="failed")
    _study(env, "1.5", job="done", result_set="encoded", deliveries=("sent", "failed"))
    _study(env, "1.6", job=None)
    listed = client.get("/api/studies", headers=viewer).json()["studies"]
    words = {s["study_uid"]: (s["delivery"] or {}).get("state") for s in listed}
    assert words == {"1.1": "waiting", "1.2": "sending", "1.3": "delivered", "1.4": "failed",
                     "1.5": "failed", "1.6": None}
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
    assert "dicomnode results retry" in study.text
    delivered = client.get("/studies/1.3")
    assert "state-delivered" in delivered.text and "2 sent, 0 pending, 0 failed" in delivered.text

"""REST API: every endpoint, its refusals (401, 403, 404, 409, 422), and preset edits on disk."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from dicomnode.db.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    PresetRevision,
    Study,
    WebSession,
    utcnow,
)
from dicomnode.web.deps import CSRF_HEADER, SESSION_COOKIE
from tests.support.dicom_files import write_op
from tests.support.onnx_models import RegistryWriter, segmenter_manifest
from tests.web.conftest import ADMIN_PASSWORD, CENTRES, SCREENING, Env

ENDPOINTS = [
    ("GET", "/api/models"), ("GET", "/api/models/green-seg"), ("GET", "/api/presets"),
    ("GET", "/api/presets/centres"), ("POST", "/api/presets"), ("PUT", "/api/presets/centres"),
    ("DELETE", "/api/presets/centres"), ("POST", "/api/presets/validate"),
    ("POST", "/api/resolve"), ("POST", "/api/route-test"), ("GET", "/api/studies"),
    ("GET", "/api/studies/1.2.3"), ("POST", "/api/deliveries/1/retry"),
    ("POST", "/api/jobs/1/results/retry"), ("GET", "/api/health"),
    ("GET", "/metrics"), ("GET", "/api/audit/presets"), ("GET", "/api/openapi.json"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_refuses_without_credentials(
    client: TestClient, method: str, path: str
) -> None:
    assert client.request(method, path).status_code == 401
    bad = {"Authorization": "Bearer dn_not-a-token"}
    assert client.request(method, path, headers=bad).status_code == 401


def test_openapi_schema_lists_the_api(client: TestClient, viewer: dict[str, str]) -> None:
    schema = client.get("/api/openapi.json", headers=viewer).json()
    for path in ("/api/models", "/api/presets/{preset_id}", "/api/resolve", "/api/route-test",
                 "/api/studies/{study_uid}", "/api/deliveries/{delivery_id}/retry",
                 "/api/health", "/metrics"):
        assert path in schema["paths"], path


# --- models -----------------------------------------------------------------------------------


def test_models_list_and_detail(client: TestClient, viewer: dict[str, str], env: Env) -> None:
    RegistryWriter(env.settings.registry.path).add(
        segmenter_manifest("broken-seg"), b"not an onnx file")
    env.state.catalog.reload()
    models = {m["id"]: m for m in client.get("/api/models", headers=viewer).json()["models"]}
    assert models["green-seg"]["version"] == "1.1.0"
    assert models["green-seg"]["versions"] == ["1.0.0", "1.1.0"]
    assert models["green-seg"]["conflicts"] == ["green-seg-alt"]
    assert models["broken-seg"]["left_out"] is True and models["broken-seg"]["reason"]
    detail = client.get("/api/models/green-seg", headers=viewer).json()
    assert detail["card"] == "Test model card.\n"
    assert detail["manifest"]["task"] == "segmentation"
    assert client.get("/api/models/green-seg?version=1.0.0", headers=viewer).json()[
        "version"] == "1.0.0"
    assert client.get("/api/models/nope", headers=viewer).status_code == 404


# --- presets ----------------------------------------------------------------------------------


def test_presets_list_and_show(client: TestClient, viewer: dict[str, str]) -> None:
    listed = client.get("/api/presets", headers=viewer).json()
    assert [p["id"] for p in listed["presets"]] == ["centres", "screening"]
    centres = client.get("/api/presets/centres", headers=viewer).json()
    assert centres["graph"]["stages"] == [["green-quality"], ["green-seg"], ["mask-centre"]]
    assert centres["file"] == "centres.yaml"
    assert client.get("/api/presets/nope", headers=viewer).status_code == 404


def test_validate_accepts_good_and_names_problems(client: TestClient,
                                                  viewer: dict[str, str]) -> None:
    ok = client.post("/api/presets/validate", headers=viewer, json=SCREENING)
    assert ok.status_code == 200 and ok.json()["ok"] is True
    unknown = client.post("/api/presets/validate", headers=viewer,
                          json={**SCREENING, "models": ["green-quality", "no-such-model"]})
    assert unknown.status_code == 422
    assert unknown.json()["problems"][0]["field"] == "models[1]"
    assert "unknown model 'no-such-model'" in unknown.json()["detail"]
    conflict = client.post("/api/presets/validate", headers=viewer,
                           json={**SCREENING, "models": ["green-seg", "green-seg-alt"]})
    assert conflict.status_code == 422 and "conflicts with" in conflict.json()["detail"]
    typo = client.post("/api/presets/validate", headers=viewer, json={**SCREENING, "modles": []})
    assert typo.status_code == 422 and "unknown key 'modles'" in typo.json()["detail"]


def test_create_writes_yaml_keeps_revision_audits_and_reloads(
    client: TestClient, admin: dict[str, str], env: Env
) -> None:
    new = {**SCREENING, "id": "new-camera", "name": "New camera",
           "routing": {"calling_ae": ["CAM9"]}}
    response = client.post("/api/presets", headers=admin, json=new)
    assert response.status_code == 201, response.text
    assert env.preset_yaml("new-camera")["routing"] == {"calling_ae": ["CAM9"]}
    assert "+id: new-camera" in response.json()["diff"]
    assert "new-camera" in env.state.catalog.catalog.presets.presets  # no restart needed
    assert client.get("/api/presets/new-camera", headers=admin).status_code == 200
    with env.database.transaction() as session:
        revision = session.scalars(select(PresetRevision)).one()
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.kind == "preset-create")).one()
    assert (revision.action, revision.actor, revision.previous) == ("create", "alice", None)
    assert event.actor == "alice" and "new-camera" in (event.detail or "")
    again = client.post("/api/presets", headers=admin, json=new)
    assert again.status_code == 409


def test_refused_create_writes_nothing(client: TestClient, admin: dict[str, str],
                                       env: Env) -> None:
    bad = {**SCREENING, "id": "bad-one", "models": ["green-seg", "green-seg-alt"]}
    assert client.post("/api/presets", headers=admin, json=bad).status_code == 422
    assert not (env.presets_dir / "bad-one.yaml").exists()
    assert sorted(p.name for p in env.presets_dir.iterdir()) == ["centres.yaml", "screening.yaml"]


def test_update_changes_file_and_diff_and_takes_effect(
    client: TestClient, admin: dict[str, str], env: Env
) -> None:
    changed = {**CENTRES, "models": ["green-quality", "green-seg-alt"], "priority": 7}
    response = client.put("/api/presets/centres", headers=admin, json=changed)
    assert response.status_code == 200, response.text
    assert env.preset_yaml("centres")["models"] == ["green-quality", "green-seg-alt"]
    assert "-- mask-centre" in response.json()["diff"]
    assert "+- green-seg-alt" in response.json()["diff"]
    graph = client.get("/api/presets/centres", headers=admin).json()["graph"]
    assert graph["stages"] == [["green-quality"], ["green-seg-alt"]]
    history = client.get("/api/audit/presets?preset=centres", headers=admin).json()
    assert history["revisions"][0]["action"] == "update"
    assert "mask-centre" in history["revisions"][0]["diff"]


def test_refused_update_leaves_file_untouched(client: TestClient, admin: dict[str, str],
                                              env: Env) -> None:
    before = (env.presets_dir / "centres.yaml").read_bytes()
    bad = {**CENTRES, "models": ["green-quality", "mask-centre", "green-seg-alt"]}
    response = client.put("/api/presets/centres", headers=admin, json=bad)
    assert response.status_code == 422
    assert "green-seg-alt" in response.json()["detail"]
    regex = {**CENTRES, "routing": {"tags": [{"tag": "StudyDescription", "regex": "("}]}}
    assert client.put("/api/presets/centres", headers=admin, json=regex).status_code == 422
    renamed = {**CENTRES, "id": "other"}
    assert client.put("/api/presets/centres", headers=admin, json=renamed).status_code == 409
    assert client.put("/api/presets/nope", headers=admin, json=CENTRES).status_code == 404
    assert (env.presets_dir / "centres.yaml").read_bytes() == before
    with env.database.transaction() as session:
        assert session.scalars(select(PresetRevision)).all() == []


def test_delete_keeps_content_as_revision(client: TestClient, admin: dict[str, str],
                                          env: Env) -> None:
    before = (env.presets_dir / "centres.yaml").read_text("utf-8")
    assert client.delete("/api/presets/centres", headers=admin).status_code == 200
    assert not (env.presets_dir / "centres.yaml").exists()
    assert client.get("/api/presets/centres", headers=admin).status_code == 404
    assert client.delete("/api/presets/centres", headers=admin).status_code == 404
    with env.database.transaction() as session:
        revision = session.scalars(select(PresetRevision)).one()
    assert revision.previous == before and revision.content is None


def test_viewer_cannot_change_anything(client: TestClient, viewer: dict[str, str],
                                       env: Env) -> None:
    before = (env.presets_dir / "centres.yaml").read_bytes()
    new = {**SCREENING, "id": "viewer-made"}
    assert client.post("/api/presets", headers=viewer, json=new).status_code == 403
    assert client.put("/api/presets/centres", headers=viewer, json=CENTRES).status_code == 403
    assert client.delete("/api/presets/centres", headers=viewer).status_code == 403
    assert client.post("/api/deliveries/1/retry", headers=viewer).status_code == 403
    assert (env.presets_dir / "centres.yaml").read_bytes() == before
    assert not (env.presets_dir / "viewer-made.yaml").exists()


# --- resolve ----------------------------------------------------------------------------------


def test_resolve_preset_reports_added_and_choices(client: TestClient,
                                                  viewer: dict[str, str]) -> None:
    body = client.post("/api/resolve", headers=viewer, json={"preset": "centres"}).json()
    assert body["stages"] == [["green-quality"], ["green-seg"], ["mask-centre"]]
    assert body["added"] == {"green-seg": "required by mask-centre"}
    assert body["modality"] == "OP"
    choices = body["choices"]
    assert choices["green-seg-alt"] == {
        "ok": False, "reason": "conflicts with green-seg", "state": "unavailable"}
    assert choices["green-seg"]["state"] == "required"
    assert choices["mask-fraction"]["ok"] is True


def test_resolve_switching_off_removes_dependants(client: TestClient,
                                                   viewer: dict[str, str]) -> None:
    body = client.post("/api/resolve", headers=viewer,
                       json={"preset": "centres", "without": ["green-seg"]}).json()
    assert body["stages"] == [["green-quality"]]
    assert body["removed"] == {
        "green-seg": "switched off", "mask-centre": "needs green-seg, which was switched off"}
    assert body["choices"]["green-seg-alt"]["ok"] is True
    on = client.post("/api/resolve", headers=viewer, json={
        "preset": "centres", "without": ["green-seg"], "with": ["green-seg-alt"]}).json()
    assert on["stages"] == [["green-quality"], ["green-seg-alt"]]
    assert on["choices"]["green-seg"]["reason"] == "conflicts with green-seg-alt"


def test_resolve_refusals(client: TestClient, viewer: dict[str, str]) -> None:
    conflict = client.post("/api/resolve", headers=viewer,
                           json={"preset": "centres", "with": ["green-seg-alt"]})
    assert conflict.status_code == 422
    assert conflict.json()["error"]["kind"] == "conflict"
    assert set(conflict.json()["error"]["models"]) == {"green-seg", "green-seg-alt"}
    unknown = client.post("/api/resolve", headers=viewer,
                          json={"models": ["green-quality"], "with": ["nope"]})
    assert unknown.status_code == 422 and unknown.json()["error"]["kind"] == "unknown"
    modality = client.post("/api/resolve", headers=viewer,
                           json={"preset": "centres", "modality": "XC"})
    assert modality.status_code == 422 and modality.json()["error"]["kind"] == "modality"
    assert client.post("/api/resolve", headers=viewer,
                       json={"preset": "nope"}).status_code == 404
    empty = client.post("/api/resolve", headers=viewer, json={})
    assert empty.status_code == 200 and empty.json()["stages"] == []
    assert empty.json()["choices"]["mask-fraction"]["reason"] == (
        "can be added; brings green-quality, green-seg")
    assert client.post("/api/resolve", headers=viewer,
                       json={"withh": ["x"]}).status_code == 422


# --- route-test -------------------------------------------------------------------------------


def test_route_test_with_uploaded_file_and_draft(client: TestClient, viewer: dict[str, str],
                                                  tmp_path: Path) -> None:
    path = write_op(tmp_path / "upload" / "R.dcm")
    with path.open("rb") as handle:
        data = handle.read()
    files = {"files": ("R.dcm", data, "application/dicom")}
    chosen = client.post("/api/route-test", headers=viewer, files=files,
                         data={"calling_ae": "CAM2"}).json()
    assert chosen["preset"] == "centres"
    centres = next(e for e in chosen["explanations"] if e["preset"] == "centres")
    held = {c["condition"]: c["held"] for c in centres["conditions"]}
    assert held == {"modality": True, "calling_ae": True}
    draft = {**CENTRES, "routing": {"modality": ["OP"], "calling_ae": ["CAM9"]}}
    import json
    moved = client.post("/api/route-test", headers=viewer, files=files,
                        data={"calling_ae": "CAM2", "draft": json.dumps(draft)}).json()
    assert moved["preset"] is None and moved["draft"] is True
    bad_draft = client.post("/api/route-test", headers=viewer, files=files,
                            data={"draft": json.dumps({**CENTRES, "models": ["nope"]})})
    assert bad_draft.status_code == 422


def test_route_test_refusals(client: TestClient, viewer: dict[str, str]) -> None:
    junk = {"files": ("x.dcm", b"not dicom at all", "application/dicom")}
    assert client.post("/api/route-test", headers=viewer, files=junk).status_code == 422
    assert client.post("/api/route-test", headers=viewer, data={}).status_code == 422
    assert client.post("/api/route-test", headers=viewer,
                       data={"study_uid": "1.2.999"}).status_code == 404


# --- studies, deliveries, health, metrics -----------------------------------------------------


def _study_with_failed_delivery(env: Env) -> int:
    with env.database.transaction() as session:
        session.add(Study(study_uid="1.2.3", state="done", calling_ae="CAM1"))
        delivery = Delivery(path="x.dcm", sop_instance_uid="1.2.3.4", sop_class_uid="1.2",
                            study_uid="1.2.3", destination="pacs", state=DeliveryState.FAILED,
                            attempts=10, last_error="connection refused")
        session.add(delivery)
        session.flush()
        return delivery.id


def test_studies_detail_and_retry(client: TestClient, admin: dict[str, str],
                                  viewer: dict[str, str], env: Env) -> None:
    delivery_id = _study_with_failed_delivery(env)
    listed = client.get("/api/studies", headers=viewer).json()
    assert [s["study_uid"] for s in listed["studies"]] == ["1.2.3"]
    assert listed["states"]["done"] == 1
    assert client.get("/api/studies?study_state=receiving", headers=viewer).json()[
        "studies"] == []
    assert client.get("/api/studies?study_state=bogus", headers=viewer).status_code == 422
    detail = client.get("/api/studies/1.2.3", headers=viewer).json()
    assert detail["deliveries"][0]["state"] == "failed"
    assert client.get("/api/studies/9.9", headers=viewer).status_code == 404
    assert client.post(f"/api/deliveries/{delivery_id}/retry", headers=viewer).status_code == 403
    retried = client.post(f"/api/deliveries/{delivery_id}/retry", headers=admin)
    assert retried.status_code == 200 and retried.json() == {"retried": [delivery_id]}
    with env.database.transaction() as session:
        assert session.get(Delivery, delivery_id).state == DeliveryState.PENDING  # type: ignore[union-attr]
    again = client.post(f"/api/deliveries/{delivery_id}/retry", headers=admin)
    assert again.status_code == 409
    assert client.post("/api/deliveries/999/retry", headers=admin).status_code == 404


def test_health_and_metrics(client: TestClient, viewer: dict[str, str], env: Env) -> None:
    _study_with_failed_delivery(env)
    health = client.get("/api/health", headers=viewer).json()
    assert health["ok"] is True and health["database"]["ok"] is True
    assert health["destinations"]["pacs"]["reachable"] is False
    assert health["presets"] == 2
    providers = {p["name"]: p for p in health["execution"]["providers"]}
    assert providers["CPUExecutionProvider"]["device"] == "found"
    if "CUDAExecutionProvider" in providers and not Path("/dev/nvidia0").exists():
        assert providers["CUDAExecutionProvider"]["device"] == "not found"
    text = client.get("/metrics", headers=viewer).text
    assert "dicomnode_studies_received_total 1" in text
    assert 'dicomnode_studies{state="done"} 1' in text
    assert 'dicomnode_deliveries{state="failed"} 1' in text
    assert "dicomnode_delivery_failures 1" in text


# --- console sessions and CSRF ----------------------------------------------------------------


def _login(client: TestClient, name: str, password: str) -> None:
    response = client.post("/login", data={"username": name, "password": password},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    assert SESSION_COOKIE in response.cookies


def test_session_needs_csrf_for_changes(client: TestClient, env: Env) -> None:
    _login(client, "alice", ADMIN_PASSWORD)
    assert client.get("/api/presets").status_code == 200
    changed = {**CENTRES, "priority": 3}
    no_csrf = client.put("/api/presets/centres", json=changed)
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.json()["detail"]
    with env.database.transaction() as session:
        csrf = session.scalars(select(WebSession.csrf_token)).one()
    wrong = client.put("/api/presets/centres", json=changed, headers={CSRF_HEADER: "x" + csrf})
    assert wrong.status_code == 403
    ok = client.put("/api/presets/centres", json=changed, headers={CSRF_HEADER: csrf})
    assert ok.status_code == 200
    assert env.preset_yaml("centres")["priority"] == 3


def test_wrong_password_and_expired_session(client: TestClient, env: Env) -> None:
    bad = client.post("/login", data={"username": "alice", "password": "wrong-password"})
    assert bad.status_code == 401 and "wrong user name or password" in bad.text
    with env.database.transaction() as session:
        refused = session.scalars(
            select(AuditEvent.actor).where(AuditEvent.kind == "login-failed")).all()
    assert refused == ["alice"]
    _login(client, "alice", ADMIN_PASSWORD)
    assert client.get("/api/models").status_code == 200
    with env.database.transaction() as session:
        session.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get("/api/models").status_code == 401
    page = client.get("/presets", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")


def test_console_pages_render(client: TestClient, env: Env) -> None:
    _study_with_failed_delivery(env)
    _login(client, "alice", ADMIN_PASSWORD)
    for path, needle in (("/presets", "Green screening"), ("/models", "green-seg-alt"),
                         ("/models/green-seg", "Test model card."),
                         ("/presets/centres", 'id="save"'), ("/presets/new", 'id="save-new"'),
                         ("/studies", "1.2.3"), ("/studies/1.2.3", "Retry"),
                         ("/audit", "Audit")):
        response = client.get(path)
        assert response.status_code == 200, path
        assert needle in response.text, path


def test_preset_yaml_written_by_api_loads_with_the_loader(
    client: TestClient, admin: dict[str, str], env: Env
) -> None:
    from dicomnode.routing import load_presets
    new = {**SCREENING, "id": "tagged", "routing": {
        "tags": [{"tag": "StudyDescription", "regex": "diabet", "ignore_case": True}]}}
    assert client.post("/api/presets", headers=admin, json=new).status_code == 201
    loaded = load_presets(env.presets_dir, registry=env.state.catalog.catalog.registry,
                          destinations={"pacs"})
    assert loaded.problems == []
    assert loaded.presets["tagged"].routing.tags[0].ignore_case is True
    assert yaml.safe_load((env.presets_dir / "tagged.yaml").read_text("utf-8"))["id"] == "tagged"


def test_update_with_stale_if_match_is_refused(client: TestClient, admin: dict[str, str],
                                               env: Env) -> None:
    etag = client.get("/api/presets/centres", headers=admin).json()["etag"]
    assert etag
    first = client.put("/api/presets/centres", json={**CENTRES, "priority": 1},
                       headers={**admin, "If-Match": etag})
    assert first.status_code == 200 and first.json()["etag"] != etag
    before = (env.presets_dir / "centres.yaml").read_bytes()
    stale = client.put("/api/presets/centres", json={**CENTRES, "priority": 2},
                       headers={**admin, "If-Match": etag})
    assert stale.status_code == 412 and "changed since you opened it" in stale.json()["detail"]
    assert (env.presets_dir / "centres.yaml").read_bytes() == before
    fresh = client.put("/api/presets/centres", json={**CENTRES, "priority": 2},
                       headers={**admin, "If-Match": first.json()["etag"]})
    assert fresh.status_code == 200
    assert env.preset_yaml("centres")["priority"] == 2


def test_logout_needs_the_form_csrf_token_and_ends_the_session(client: TestClient,
                                                               env: Env) -> None:
    _login(client, "alice", ADMIN_PASSWORD)
    assert client.post("/logout", data={}, follow_redirects=False).status_code == 403
    with env.database.transaction() as session:
        csrf = session.scalars(select(WebSession.csrf_token)).one()
    out = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303
    with env.database.transaction() as session:
        assert session.scalars(select(WebSession)).all() == []
    assert client.get("/api/models").status_code == 401

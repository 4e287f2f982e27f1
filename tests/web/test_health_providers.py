"""Health: "in the package" is not "a device answered" nor "what the last run used" (API and
console). On this machine there is no GPU: onnxruntime-gpu lists CUDA, the probe finds no
device, and the last job ran on the CPU."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from dicomnode.db.models import Job, ModelRun, Study, utcnow
from tests.web.conftest import VIEWER_PASSWORD, Env


def _no_gpu() -> bool:
    return not Path("/dev/nvidia0").exists()


def _two_jobs(env: Env) -> int:
    """An older job that ran on CUDA (another node, say), then a newer one on the CPU."""
    with env.database.transaction() as session:
        study = Study(study_uid="1.2.3", state="done", calling_ae="CAM1")
        session.add(study)
        session.flush()
        ids = []
        for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
            job = Job(study_id=study.id, study_uid="1.2.3", preset="screening",
                      graph_json="{}", state="done")
            session.add(job)
            session.flush()
            session.add(ModelRun(job_id=job.id, model_id="green-seg", version="1.0.0",
                                 provider=provider, status="ok", finished_at=utcnow()))
            ids.append(job.id)
        return ids[-1]


def test_api_health_separates_package_device_and_last_run(
    client: TestClient, viewer: dict[str, str], env: Env
) -> None:
    health = client.get("/api/health", headers=viewer).json()
    assert health["execution"]["in_use"] is None  # nothing has run yet
    last_job = _two_jobs(env)
    execution = client.get("/api/health", headers=viewer).json()["execution"]
    assert execution["probed"] is True
    providers = {p["name"]: p for p in execution["providers"]}
    assert providers["CPUExecutionProvider"] == {
        "name": "CPUExecutionProvider", "in_package": True, "device": "found", "detail": ""}
    if "CUDAExecutionProvider" in providers and _no_gpu():
        assert providers["CUDAExecutionProvider"]["in_package"] is True
        assert providers["CUDAExecutionProvider"]["device"] == "not found"
    assert execution["in_use"] == "CPUExecutionProvider"
    assert execution["last_run"]["job_id"] == last_job


def test_console_health_page(client: TestClient, env: Env) -> None:
    _two_jobs(env)
    login = client.post("/login", data={"username": "victor", "password": VIEWER_PASSWORD},
                        follow_redirects=False)
    assert login.status_code == 303
    page = client.get("/health")
    assert page.status_code == 200
    assert "In use: <b>CPUExecutionProvider</b>" in page.text
    if "CUDAExecutionProvider" in page.text and _no_gpu():
        row = page.text.split('data-provider="CUDAExecutionProvider"')[1].split("</tr>")[0]
        assert '<td class="device">not found</td>' in row

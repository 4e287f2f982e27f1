"""Remote inference over the Open Inference Protocol against a real Seldon MLServer on
loopback: the same graph run in-process and remotely gives the same outputs through the real
executor; a server that is down raises a transient error (the job waits), never a model failure;
health reports the server's and the models' readiness."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from dicomnode.db import open_database
from dicomnode.db.models import AuditEvent
from dicomnode.errors import InferenceUnavailableError
from dicomnode.graph import Selection, resolve
from dicomnode.inference.executor import GraphExecutor
from dicomnode.inference.preprocess import SourceImage
from dicomnode.inference.remote import RemoteClient
from dicomnode.inference.sessions import SessionPool
from dicomnode.jobs import ProcessingService, queue
from dicomnode.registry import Registry, load_registry
from dicomnode.routing import load_presets
from dicomnode.settings import RemoteInferenceSettings, Settings
from dicomnode.synthetic import synthetic_fundus_with_truth
from tests.support.databases import database_url
from tests.support.executor_fixtures import add_study, write_diamond, write_preset
from tests.support.mlserver import mlserver
from tests.support.peers import free_port

ROOT = Path(__file__).resolve().parents[2]
# A chain (optic-disc -> disc-metrics), a gate (fundus-quality) and a classifier.
MODELS = ["fundus-quality", "laterality", "optic-disc", "disc-metrics"]


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlserver([registry.get(m) for m in MODELS], tmp_path_factory.mktemp("mlserver")) as url:
        yield url


def _pool(url: str, *, total: float = 5.0) -> SessionPool:
    client = RemoteClient(RemoteInferenceSettings(
        url=url, timeout_seconds=30, retry_delay_seconds=0.01, retry_total_seconds=total))
    return SessionPool(["CPUExecutionProvider"], remote=client,
                       backend_for=lambda model_id: "remote")


def _images() -> list[SourceImage]:
    images = []
    for index, side in enumerate("RL"):
        rgb, _ = synthetic_fundus_with_truth(384, side, seed=index)  # type: ignore[arg-type]
        images.append(SourceImage(f"1.2.826.0.1.3680043.10.77.{index}", rgb))
    return images


def test_remote_outputs_equal_in_process(registry: Registry, server: str) -> None:
    graph = resolve(Selection.of(MODELS, modality="OP"), registry)
    images = _images()
    local = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"])).run(graph, images)
    pool = _pool(server)
    remote = GraphExecutor(registry, pool).run(graph, images)
    assert remote.outcome == local.outcome == "done", remote.problems()
    for model_id in MODELS:
        mine, theirs = local.models[model_id], remote.models[model_id]
        assert theirs.provider == f"remote:{server}"
        assert mine.provider == "CPUExecutionProvider"
        assert theirs.run_images == mine.run_images and theirs.run_images
        assert theirs.raw.keys() == mine.raw.keys()
        for output, values in mine.raw.items():
            for uid, value in values.items():
                got = theirs.raw[output][uid]
                assert got.shape == value.shape and got.dtype == value.dtype
                np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6)
        for output, findings in mine.findings.items():
            assert {u: f.label for u, f in findings.items()} == {
                u: f.label for u, f in theirs.findings[output].items()}
    # Health: the server and every model this pool sent there are ready.
    assert pool.remote is not None
    status = pool.remote.status([(m, "1.0.0") for m in MODELS])
    assert status["ready"] is True and status["failing_since"] is None
    assert all(v["ready"] for v in status["models"].values()), status
    missing = pool.remote.status([("no-such-model", "1.0.0")])
    assert missing["models"]["no-such-model@1.0.0"]["ready"] is False


def test_a_down_server_is_transient_not_a_model_failure(registry: Registry) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    graph = resolve(Selection.of(["laterality"], modality="OP"), registry)
    pool = _pool(url, total=1.0)
    with pytest.raises(InferenceUnavailableError, match="unavailable"):
        GraphExecutor(registry, pool).run(graph, _images()[:1])
    assert pool.remote is not None
    status = pool.remote.status([("laterality", "1.0.0")])
    assert status["ready"] is False and "ConnectError" in status["error"]
    assert status["failing_since"] is not None and status["retries"] >= 2
    assert "ConnectError" in status["last_error"]


def test_a_job_waits_for_the_server_then_runs_once(tmp_path: Path) -> None:
    """Server down: the job goes back to the queue (visible, not failed, nothing recorded);
    once the server is up, the next attempt records every model run exactly once."""
    storage = tmp_path / "storage"
    storage.mkdir()
    write_diamond(tmp_path / "registry", slow_repeats=1)
    write_preset(tmp_path / "presets", "screening", ["gated-fraction", "total"])
    port = free_port()
    with database_url("sqlite", tmp_path) as url:
        settings = Settings.model_validate({
            "storage": {"path": storage}, "database": {"url": url},
            "registry": {"path": tmp_path / "registry"},
            "presets": {"path": tmp_path / "presets"},
            "inference": {
                "workers": 0, "backend": "remote",
                "remote": {"url": f"http://127.0.0.1:{port}", "retry_delay_seconds": 0.05,
                           "retry_total_seconds": 0.2, "retry_max_delay_seconds": 1.0},
            },
        })
        database = open_database(url)
        try:
            registry = load_registry(settings.registry.path)
            presets = load_presets(settings.presets.path, registry=registry, destinations=set())
            service = ProcessingService(settings, database, registry, presets)
            uid, _ = add_study(database, storage, [200, 0, 200])
            service.on_study_complete(uid)
            job_id = service.run_once()
            assert job_id is not None
            waiting = queue.job_detail(database, job_id)
            assert waiting["state"] == "queued" and waiting["runs"] == []
            assert "unavailable" in waiting["outcome"]["waiting"]
            assert service.run_once() is None  # backing off: not claimable yet
            assert service.health()["remote"]["ready"] is False
            graph_models = sorted(waiting["graph"]["models"])
            with mlserver([registry.get(m) for m in graph_models], tmp_path / "mls",
                          port=port):
                time.sleep(1.0)  # past the backoff
                assert service.run_once() == job_id
                health = service.health()["remote"]
            detail = queue.job_detail(database, job_id)
            # The wait for the server is not an attempt (inference.max_job_attempts counts
            # crashes): the one attempt that ran is the one that recorded the runs.
            assert detail["state"] == "done" and detail["attempts"] == 1, detail["outcome"]
            assert sorted(r["model_id"] for r in detail["runs"]) == graph_models
            assert {r["provider"] for r in detail["runs"]} == {f"remote:http://127.0.0.1:{port}"}
            assert health["ready"] is True and health["failing_since"] is None
            assert all(v["ready"] for v in health["models"].values()) and health["models"]
            with database.transaction() as session:
                kinds = session.scalars(select(AuditEvent.kind).where(
                    AuditEvent.study_uid == uid).order_by(AuditEvent.id)).all()
            assert kinds.count("job-waiting") == 1 and kinds.count("job-done") == 1
        finally:
            database.dispose()


def test_a_server_too_slow_to_answer_is_transient(registry: Registry) -> None:
    """A server that accepts the connection but never answers: the request times out, is
    retried, then reported as unavailable (the job would wait), never a model failure."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the backlog; nothing ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = RemoteClient(RemoteInferenceSettings(
            url=url, timeout_seconds=0.3, retry_delay_seconds=0.01, retry_total_seconds=0.5))
        pool = SessionPool(["CPUExecutionProvider"], remote=client,
                           backend_for=lambda model_id: "remote")
        graph = resolve(Selection.of(["laterality"], modality="OP"), registry)
        with pytest.raises(InferenceUnavailableError, match=r"(Read|Write)Timeout"):
            GraphExecutor(registry, pool).run(graph, _images()[:1])
        assert client.retries >= 2 and client.failing_since is not None

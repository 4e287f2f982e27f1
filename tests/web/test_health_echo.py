"""GET /api/health checks each destination with a real C-ECHO (Orthanc as the PACS)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from dicomnode.settings import DestinationSettings, Settings
from dicomnode.web.app import create_app
from dicomnode.web.state import WebState
from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port
from tests.web.conftest import Env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("pacs"), free_port(), free_port())
    peer.start()
    yield peer
    peer.stop()


def _client(env: Env, orthanc: Orthanc, cache_seconds: float) -> TestClient:
    destinations = {
        "orthanc": DestinationSettings(ae_title=ORTHANC_AET, host="127.0.0.1",
                                       port=orthanc.dicom_port),
        # The port accepts TCP connections: only an association can tell this one is wrong.
        "wrong-ae": DestinationSettings(ae_title="NOTTHEPACS", host="127.0.0.1",
                                        port=orthanc.dicom_port),
        "closed": DestinationSettings(ae_title=ORTHANC_AET, host="127.0.0.1", port=free_port()),
    }
    web = env.settings.web.model_copy(update={"health_cache_seconds": cache_seconds})
    settings: Settings = env.settings.model_copy(
        update={"destinations": destinations, "web": web})
    return TestClient(create_app(WebState(settings, env.database, env.state.catalog)))


def test_health_echoes_destinations(env: Env, orthanc: Orthanc,
                                    viewer: dict[str, str]) -> None:
    with _client(env, orthanc, 30) as client:
        report = client.get("/api/health", headers=viewer).json()["destinations"]
        assert sorted(report) == ["closed", "orthanc", "wrong-ae"]
        good = report["orthanc"]
        assert good["reachable"] is True and good["status"] == "success"
        assert "answered C-ECHO" in good["detail"] and "error" not in good
        assert good["ae_title"] == ORTHANC_AET
        wrong = report["wrong-ae"]
        assert wrong["reachable"] is False and "rejected" in wrong["error"]
        closed = report["closed"]
        assert closed["reachable"] is False and "could not connect" in closed["error"]
        for entry in report.values():
            assert datetime.fromisoformat(entry["checked_at"]).tzinfo is not None
        # Polled again within the cache time: the same answers, no new association.
        again = client.get("/api/health", headers=viewer).json()["destinations"]
        assert again == report


def test_health_echoes_again_once_the_cache_is_old(env: Env, orthanc: Orthanc,
                                                    viewer: dict[str, str]) -> None:
    with _client(env, orthanc, 0) as client:
        first = client.get("/api/health", headers=viewer).json()["destinations"]["orthanc"]
        second = client.get("/api/health", headers=viewer).json()["destinations"]["orthanc"]
    assert second["reachable"] is True
    assert second["checked_at"] > first["checked_at"]

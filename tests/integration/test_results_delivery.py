"""A study's delivery summary over the real path: job -> results pipeline -> dispatcher ->
a real Orthanc. waiting -> sending -> delivered; a refusing destination gives failed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.dispatch import Dispatcher, outbox
from dicomnode.jobs import ProcessingService
from dicomnode.registry import load_registry
from dicomnode.results.pipeline import ResultsPipeline
from dicomnode.results.summary import DeliverySummary, summarise
from dicomnode.routing import load_presets
from dicomnode.settings import ResultsSettings, Settings
from tests.integration.test_dispatch import orthanc  # noqa: F401  (the module's Orthanc)
from tests.support.executor_fixtures import add_study, write_diamond
from tests.support.orthanc import NODE_AET, ORTHANC_AET, Orthanc
from tests.unit.results.test_pipeline import PRESET

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, port: int, ae_title: str, max_attempts: int) -> Settings:
    return Settings.model_validate({
        "node": {"ae_title": NODE_AET},
        "storage": {"path": tmp_path / "storage"},
        "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
        "registry": {"path": tmp_path / "registry"},
        "presets": {"path": tmp_path / "presets"},
        "destinations": {"pacs": {"ae_title": ae_title, "host": "127.0.0.1", "port": port}},
        "inference": {"workers": 0, "lease_seconds": 30, "poll_seconds": 0.2},
        "dispatch": {"first_delay_seconds": 0.1, "max_delay_seconds": 0.5,
                     "max_attempts": max_attempts, "poll_seconds": 0.1,
                     "connect_timeout_seconds": 2, "network_timeout_seconds": 10},
    })


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "storage").mkdir()
    write_diamond(tmp_path / "registry", slow_repeats=1)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "screening.yaml").write_text(yaml.safe_dump(PRESET), "utf-8")
    databases: list[Database] = []

    def make(port: int, ae_title: str = ORTHANC_AET, max_attempts: int = 3
             ) -> tuple[Settings, Database, ProcessingService, ResultsPipeline, Dispatcher]:
        settings = _settings(tmp_path, port, ae_title, max_attempts)
        database = open_database(settings.database.url)
        databases.append(database)
        registry = load_registry(settings.registry.path)
        presets = load_presets(settings.presets.path, registry=registry,
                               destinations=set(settings.destinations))
        assert not presets.problems, presets.problems
        return (settings, database, ProcessingService(settings, database, registry, presets),
                ResultsPipeline(settings, database, registry, presets),
                Dispatcher(settings, database))

    yield make
    for database in databases:
        database.dispose()


def _summary(database: Database, uid: str) -> DeliverySummary:
    with database.transaction() as session:
        # The pipelines here use the default attempt limit (settings.results).
        return summarise(session, max_attempts=ResultsSettings().max_attempts)[uid]


def _drain(dispatcher: Dispatcher, database: Database, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dispatcher.run_once()
        if all(r["state"] in ("sent", "failed") for r in outbox.list_deliveries(database)):
            return
        time.sleep(0.1)


def test_study_goes_waiting_sending_delivered(node: Any, orthanc: Orthanc) -> None:  # noqa: F811
    settings, database, service, pipeline, dispatcher = node(orthanc.dicom_port)
    uid, _ = add_study(database, settings.storage.path, [200, 180])
    service.on_study_complete(uid)
    queued = _summary(database, uid)
    assert (queued.state, queued.results) == ("waiting", "pending")
    assert service.run_once() == queued.job_id
    assert _summary(database, uid).state == "waiting"  # the job is done, nothing encoded

    [outcome] = pipeline.run_once()
    assert outcome.state == "encoded" and outcome.deliveries > 0
    sending = _summary(database, uid)
    assert (sending.state, sending.results, sending.pending, sending.sent) == (
        "sending", "encoded", outcome.deliveries, 0)

    _drain(dispatcher, database)
    delivered = _summary(database, uid)
    assert (delivered.state, delivered.sent, delivered.pending, delivered.failed) == (
        "delivered", outcome.deliveries, 0, 0)
    stored = set(orthanc.sop_instance_uids())
    assert all(r["sop_instance_uid"] in stored for r in outbox.list_deliveries(database))


def test_refusing_destination_makes_the_study_failed(
    node: Any, orthanc: Orthanc  # noqa: F811
) -> None:
    settings, database, service, pipeline, dispatcher = node(
        orthanc.dicom_port, ae_title="WRONGAET", max_attempts=1)
    uid, _ = add_study(database, settings.storage.path, [200])
    service.on_study_complete(uid)
    service.run_once()
    [outcome] = pipeline.run_once()
    assert _summary(database, uid).state == "sending"
    _drain(dispatcher, database)
    failed = _summary(database, uid)
    assert (failed.state, failed.results, failed.failed, failed.sent) == (
        "failed", "encoded", outcome.deliveries, 0)
    assert all("rejected" in str(r["last_error"]) for r in outbox.list_deliveries(database))

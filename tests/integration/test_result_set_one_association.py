"""A result set reaches the PACS over one association, its images' objects while its report
is still being built: DCMTK storescp (verbose, one file per reception) as the PACS, the
results pipeline and the dispatcher running in this process as `serve` wires them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import Delivery, DeliveryState, Result, ResultSet
from dicomnode.dispatch.dispatcher import Dispatcher
from dicomnode.jobs import ProcessingService
from dicomnode.registry import load_registry
from dicomnode.results import pipeline as pipeline_module
from dicomnode.results.encode import encode_report
from dicomnode.results.pipeline import ResultsPipeline
from dicomnode.routing import load_presets
from dicomnode.settings import Settings
from tests.support.executor_fixtures import add_study, write_diamond
from tests.support.peers import free_port
from tests.support.storescp import STORESCP_AET, StoreScp

pytestmark = pytest.mark.integration

REPORT_DELAY = 1.5  # the SR takes this long to build: the images' objects go first


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreScp]:
    peer = StoreScp(tmp_path / "pacs", free_port(), verbose=True).start()
    yield peer
    peer.stop()


@pytest.fixture
def settings(tmp_path: Path, pacs: StoreScp) -> Settings:
    storage = tmp_path / "storage"
    storage.mkdir()
    write_diamond(tmp_path / "registry", slow_repeats=1)
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "screening.yaml").write_text(yaml.safe_dump({
        "id": "screening", "name": "Screening", "audience": "tests",
        "description": "one association per result set", "models": ["gated-fraction", "total"],
        "outputs": {"sr": True, "seg": True, "overlay": True}, "destinations": ["pacs"],
        "routing": {"modality": ["OP"]},
    }), "utf-8")
    return Settings.model_validate({
        "storage": {"path": storage},
        "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
        "registry": {"path": tmp_path / "registry"},
        "presets": {"path": tmp_path / "presets"},
        "destinations": {"pacs": {"ae_title": STORESCP_AET, "host": "127.0.0.1",
                                  "port": pacs.port}},
        "inference": {"workers": 0},
        "dispatch": {"poll_seconds": 300},  # woken, never polled
    })


def _deliveries(database: Database) -> list[Delivery]:
    with database.transaction() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def test_a_result_set_goes_over_one_association_images_first(
    settings: Settings, pacs: StoreScp, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = encode_report  # what the pipeline calls

    def slow_report(*args: Any, **kwargs: Any) -> Any:
        time.sleep(REPORT_DELAY)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "encode_report", slow_report)
    database = open_database(settings.database.url)
    registry = load_registry(settings.registry.path)
    presets = load_presets(settings.presets.path, registry=registry,
                           destinations=set(settings.destinations))
    dispatcher = Dispatcher(settings, database)
    pipeline = ResultsPipeline(settings, database, registry, presets,
                               on_queued=dispatcher.wake, expecting=dispatcher.expecting)
    service = ProcessingService(settings, database, registry, presets)
    dispatcher.start()
    try:
        uid, _ = add_study(database, settings.storage.path, [200, 180])
        service.on_study_complete(uid)
        job_id = service.run_once()
        assert job_id is not None
        outcome = pipeline.encode_job(job_id)
        assert (outcome.state, outcome.objects, outcome.deliveries) == ("encoded", 5, 5)
        deadline = time.monotonic() + 60
        while any(d.state != DeliveryState.SENT for d in _deliveries(database)):
            assert time.monotonic() < deadline, "results not delivered within 60 s"
            time.sleep(0.05)
    finally:
        dispatcher.stop()
    with database.transaction() as session:
        kinds = dict(session.execute(select(Result.sop_instance_uid, Result.kind)).all())
        encoded_at = session.scalars(select(ResultSet.finished_at)).one()
    assert encoded_at is not None
    database.dispose()
    deliveries = _deliveries(database)
    # Every object once, over one association (the SR followed on it).
    assert pacs.receptions() == {d.sop_instance_uid: 1 for d in deliveries}
    assert pacs.associations() == 1, pacs.log_path.read_text()
    by_time = sorted(deliveries, key=lambda d: d.sent_at or encoded_at)
    assert [kinds[d.sop_instance_uid] for d in by_time] == ["seg", "seg", "overlay",
                                                            "overlay", "sr"]
    # The images' objects were in the PACS before the report was built and recorded.
    images_sent = [d.sent_at for d in by_time[:4]]
    assert all(t is not None and t < encoded_at for t in images_sent)

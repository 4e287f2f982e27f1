"""Dispatch against a real Orthanc on loopback: arrival, outage and restart, refusal and retry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import DeliveryState
from dicomnode.dispatch import Dispatcher, outbox
from dicomnode.dispatch.sender import echo
from dicomnode.results.overlay import build_overlay
from dicomnode.results.seg import build_segmentation
from dicomnode.results.sr import NodeIdentity, build_report
from dicomnode.settings import (
    DatabaseSettings,
    DestinationSettings,
    DispatchSettings,
    NodeSettings,
    Settings,
    StorageSettings,
)
from tests.support.orthanc import NODE_AET, ORTHANC_AET, Orthanc
from tests.support.peers import free_port
from tests.unit.results.sources import findings_for, masks_for, source_image

pytestmark = pytest.mark.integration

# Enough C-ECHOs that a 1-in-100 misreading shows up in nearly every run (2 of 150 before).
REJECTION_ATTEMPTS = 300


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port())
    peer.start()
    yield peer
    peer.stop()


def _settings(tmp_path: Path, port: int, *, ae_title: str = ORTHANC_AET,
              max_attempts: int = 5, slow_retry_seconds: float = 3600.0) -> Settings:
    return Settings(
        node=NodeSettings(ae_title=NODE_AET),
        storage=StorageSettings(path=tmp_path),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'node.db'}"),
        destinations={"pacs": DestinationSettings(ae_title=ae_title, host="127.0.0.1",
                                                  port=port)},
        dispatch=DispatchSettings(first_delay_seconds=0.2, factor=2.0, max_delay_seconds=1.0,
                                  max_attempts=max_attempts, poll_seconds=0.1,
                                  lease_seconds=1.0, connect_timeout_seconds=2.0,
                                  network_timeout_seconds=10.0,
                                  slow_retry_seconds=slow_retry_seconds),
    )


def _results(folder: Path) -> list[Path]:
    """A SEG, an SR and an overlay made from a synthetic OP image, written as files."""
    folder.mkdir(parents=True, exist_ok=True)
    source, vessels, disc = source_image("op", size=64, study_uid=generate_uid())
    masks = masks_for(vessels, disc)
    findings = findings_for(vessels, disc)
    seg = build_segmentation(source, masks)
    sr = build_report([source], {source.SOPInstanceUID: findings}, [seg],
                      node=NodeIdentity(uid=generate_uid(), name=NODE_AET))
    overlay = build_overlay(source, masks, findings)
    paths = [folder / "seg.dcm", folder / "sr.dcm", folder / "overlay.dcm"]
    for obj, path in zip((seg, sr, overlay), paths, strict=True):
        obj.save_as(path)
    return paths


def _uids(paths: list[Path]) -> list[str]:
    import pydicom

    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def _enqueue(dispatcher: Dispatcher, database: Database, paths: list[Path]) -> None:
    with database.transaction() as session:
        for path in paths:
            dispatcher.enqueue(session, path, ["pacs"])


def _drain(dispatcher: Dispatcher, database: Database, seconds: float = 10) -> list[str]:
    """Run passes until nothing is pending or sending; return the states."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dispatcher.run_once()
        states = [row["state"] for row in outbox.list_deliveries(database)]
        if all(s in (DeliveryState.SENT, DeliveryState.FAILED) for s in states):
            return states
        time.sleep(0.1)
    return [row["state"] for row in outbox.list_deliveries(database)]


def test_results_arrive_once_over_the_background_loop(tmp_path: Path, orthanc: Orthanc) -> None:
    settings = _settings(tmp_path, orthanc.dicom_port)
    database = open_database(settings.database.url)
    paths = _results(tmp_path / "out")
    before = orthanc.sop_instance_uids()
    dispatcher = Dispatcher(settings, database)
    dispatcher.start()
    try:
        _enqueue(dispatcher, database, paths)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            rows = outbox.list_deliveries(database)
            if all(r["state"] == DeliveryState.SENT for r in rows):
                break
            time.sleep(0.1)
    finally:
        dispatcher.stop()
        database.dispose()
    rows = outbox.list_deliveries(database)
    assert [r["state"] for r in rows] == [DeliveryState.SENT] * 3, rows
    assert [r["attempts"] for r in rows] == [1, 1, 1]
    arrived = [u for u in orthanc.sop_instance_uids() if u not in before]
    assert sorted(arrived) == sorted(_uids(paths))


def test_outage_and_restart_lose_nothing(tmp_path: Path) -> None:
    """PACS down: deliveries wait and retry; a new dispatcher (node restart) delivers each
    object once after the PACS comes up, including one a dead node left `sending`."""
    pacs = Orthanc(tmp_path / "pacs", free_port(), free_port())
    settings = _settings(tmp_path, pacs.dicom_port, max_attempts=50)
    paths = _results(tmp_path / "out")
    database = open_database(settings.database.url)
    first = Dispatcher(settings, database)
    _enqueue(first, database, paths[:1])
    result = first.run_once()
    assert (result.claimed, result.sent, result.retrying) == (1, 0, 1)
    [row] = outbox.list_deliveries(database)
    assert row["state"] == DeliveryState.PENDING
    assert "could not connect" in row["last_error"]
    # A second object is claimed by a node that dies before recording anything.
    _enqueue(first, database, paths[1:])
    time.sleep(0.25)
    claimed = outbox.claim_due(database, settings.dispatch, "dead-node")
    assert {c.sop_instance_uid for c in claimed} == set(_uids(paths))
    database.dispose()

    pacs.start()
    try:
        database = open_database(settings.database.url)  # the restarted node
        second = Dispatcher(settings, database)
        states = _drain(second, database, seconds=15)
        assert states == [DeliveryState.SENT] * 3, outbox.list_deliveries(database)
        assert sorted(pacs.sop_instance_uids()) == sorted(_uids(paths))
        # Nothing more is due: another pass sends nothing again.
        assert second.run_once().claimed == 0
        database.dispose()
    finally:
        pacs.stop()


def test_refusing_destination_fails_then_retry_delivers_once(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    wrong = _settings(tmp_path, orthanc.dicom_port, ae_title="WRONGAET", max_attempts=2)
    database = open_database(wrong.database.url)
    paths = _results(tmp_path / "out")
    dispatcher = Dispatcher(wrong, database)
    _enqueue(dispatcher, database, paths[:1])
    states = _drain(dispatcher, database)
    assert states == [DeliveryState.FAILED]
    [row] = outbox.list_deliveries(database, state=DeliveryState.FAILED)
    assert row["attempts"] == 2
    assert "rejected" in row["last_error"]
    assert _uids(paths[:1])[0] not in orthanc.sop_instance_uids()

    fixed = _settings(tmp_path, orthanc.dicom_port)  # the operator fixes the AE title
    assert outbox.retry(database, all_failed=True) == [row["id"]]
    dispatcher = Dispatcher(fixed, database)
    assert _drain(dispatcher, database) == [DeliveryState.SENT]
    assert orthanc.sop_instance_uids().count(_uids(paths[:1])[0]) == 1
    database.dispose()


def test_a_rejection_is_reported_as_a_rejection_every_time(orthanc: Orthanc) -> None:
    """Orthanc closes the connection right after its A-ASSOCIATE-RJ; pynetdicom then reported
    about 1 attempt in 100 as an abort. The sender reads the RJ PDU itself, so none may."""
    wrong = DestinationSettings(ae_title="NOTTHEPACS", host="127.0.0.1", port=orthanc.dicom_port)
    details = [echo("wrong", wrong, calling_ae=NODE_AET, settings=DispatchSettings()).detail
               for _ in range(REJECTION_ATTEMPTS)]
    misread = [d for d in details if "rejected" not in d]
    assert misread == [], f"{len(misread)} of {REJECTION_ATTEMPTS}: {misread[0]}"


def _fail_against_a_closed_port(tmp_path: Path, **kwargs: object) -> tuple[
        Orthanc, Settings, Database, Dispatcher, list[Path]]:
    pacs = Orthanc(tmp_path / "pacs", free_port(), free_port())
    settings = _settings(tmp_path, pacs.dicom_port, max_attempts=2, **kwargs)  # type: ignore[arg-type]
    database = open_database(settings.database.url)
    dispatcher = Dispatcher(settings, database)
    paths = _results(tmp_path / "out")[:1]
    _enqueue(dispatcher, database, paths)
    assert _drain(dispatcher, database) == [DeliveryState.FAILED]
    return pacs, settings, database, dispatcher, paths


def test_failed_deliveries_keep_trying_slowly_and_heal_without_an_operator(
    tmp_path: Path
) -> None:
    from sqlalchemy import update

    from dicomnode.db.models import Delivery, utcnow

    pacs, settings, database, dispatcher, paths = _fail_against_a_closed_port(
        tmp_path, slow_retry_seconds=0.5)
    # A second one queued long ago, past dispatch.give_up_after_hours: left alone.
    old_paths = _results(tmp_path / "old")[:1]
    _enqueue(dispatcher, database, old_paths)
    assert _drain(dispatcher, database) == [DeliveryState.FAILED] * 2
    long_ago = utcnow() - timedelta(hours=settings.dispatch.give_up_after_hours + 1)
    with database.transaction() as session:
        session.execute(update(Delivery).where(Delivery.sop_instance_uid == _uids(old_paths)[0])
                        .values(created_at=long_ago))
    pacs.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            dispatcher.run_once()
            if pacs.sop_instance_uids():
                break
            time.sleep(0.2)
        states = {r["sop_instance_uid"]: r["state"] for r in outbox.list_deliveries(database)}
        assert states == {_uids(paths)[0]: DeliveryState.SENT,
                          _uids(old_paths)[0]: DeliveryState.FAILED}
        assert pacs.sop_instance_uids() == _uids(paths)
    finally:
        pacs.stop()
        database.dispose()


def test_a_destination_that_answers_c_echo_again_gets_its_failed_deliveries_at_once(
    tmp_path: Path
) -> None:
    pacs, _, database, dispatcher, paths = _fail_against_a_closed_port(tmp_path)
    assert dispatcher.run_once().claimed == 0  # slow retry an hour away
    assert dispatcher.probe_failed_destinations() == 0  # still down
    pacs.start()
    try:
        assert dispatcher.probe_failed_destinations() == 1
        assert _drain(dispatcher, database) == [DeliveryState.SENT]
        assert pacs.sop_instance_uids() == _uids(paths)
    finally:
        pacs.stop()
        database.dispose()


def test_changed_destination_settings_retry_its_failed_deliveries_at_once(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    wrong = _settings(tmp_path, orthanc.dicom_port, ae_title="WRONGAET", max_attempts=1)
    database = open_database(wrong.database.url)
    paths = _results(tmp_path / "out")[:1]
    dispatcher = Dispatcher(wrong, database)
    dispatcher.check_settings_changes()  # what start() does: records the settings
    _enqueue(dispatcher, database, paths)
    assert _drain(dispatcher, database) == [DeliveryState.FAILED]
    dispatcher.check_settings_changes()  # unchanged: nothing becomes due
    assert dispatcher.run_once().claimed == 0
    fixed = Dispatcher(_settings(tmp_path, orthanc.dicom_port), database)  # restarted
    fixed.check_settings_changes()
    assert _drain(fixed, database) == [DeliveryState.SENT]
    assert orthanc.sop_instance_uids().count(_uids(paths)[0]) == 1
    database.dispose()

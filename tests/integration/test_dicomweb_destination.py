"""A DICOMweb destination against Orthanc with its DICOMweb plugin (STOW-RS, QIDO-RS), behind
HTTP basic authentication: results arrive and read back identical; an outage is retried, ends
`failed` after the last attempt, and an operator's retry delivers each object once."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import DeliveryState
from dicomnode.dispatch import Dispatcher, outbox
from dicomnode.dispatch.check import check_destination
from dicomnode.results.seg import build_segmentation
from dicomnode.results.sr import NodeIdentity, build_report
from dicomnode.settings import (
    BasicAuthSettings,
    DatabaseSettings,
    DicomWebAuthSettings,
    DicomWebDestinationSettings,
    DispatchSettings,
    NodeSettings,
    Settings,
    StorageSettings,
)
from tests.support.dicom_files import dataset_bytes
from tests.support.orthanc import NODE_AET, Orthanc
from tests.support.peers import free_port
from tests.unit.results.sources import findings_for, masks_for, source_image

pytestmark = pytest.mark.integration

USER, PASSWORD = "dicomnode", "stow-secret-1"


def _destination(orthanc: Orthanc, password_file: Path) -> DicomWebDestinationSettings:
    return DicomWebDestinationSettings(
        type="dicomweb", url=orthanc.dicomweb_url, timeout_seconds=5,
        auth=DicomWebAuthSettings(basic=BasicAuthSettings(user=USER,
                                                          password_file=password_file)))


def _settings(tmp_path: Path, destination: DicomWebDestinationSettings,
              max_attempts: int = 5) -> Settings:
    return Settings(
        node=NodeSettings(ae_title=NODE_AET),
        storage=StorageSettings(path=tmp_path),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'node.db'}"),
        destinations={"web": destination},
        dispatch=DispatchSettings(first_delay_seconds=0.1, factor=1.0, max_delay_seconds=0.2,
                                  max_attempts=max_attempts, poll_seconds=0.1,
                                  lease_seconds=2.0),
    )


def _results(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    source, vessels, disc = source_image("op", size=64, study_uid=generate_uid())
    masks = masks_for(vessels, disc)
    seg = build_segmentation(source, masks)
    sr = build_report([source], {source.SOPInstanceUID: findings_for(vessels, disc)}, [seg],
                      node=NodeIdentity(uid=generate_uid(), name=NODE_AET))
    paths = [folder / "seg.dcm", folder / "sr.dcm"]
    for obj, path in zip((seg, sr), paths, strict=True):
        obj.save_as(path)
    return paths


def _enqueue(dispatcher: Dispatcher, database: Database, paths: list[Path]) -> None:
    with database.transaction() as session:
        for path in paths:
            dispatcher.enqueue(session, path, ["web"])


def _drain(dispatcher: Dispatcher, database: Database, seconds: float = 20) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dispatcher.run_once()
        states = [row["state"] for row in outbox.list_deliveries(database)]
        if all(s in (DeliveryState.SENT, DeliveryState.FAILED) for s in states):
            return states
        time.sleep(0.1)
    return [row["state"] for row in outbox.list_deliveries(database)]


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_results_arrive_over_stow_rs_and_read_back_identical(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(), dicomweb=True,
                      users={USER: PASSWORD})
    orthanc.start()
    try:
        (tmp_path / "pw").write_text(PASSWORD + "\n", "utf-8")
        destination = _destination(orthanc, tmp_path / "pw")
        settings = _settings(tmp_path, destination)
        check = check_destination("web", destination, calling_ae=NODE_AET,
                                  settings=settings.dispatch)
        assert check.ok, check.detail
        (tmp_path / "wrong").write_text("not-the-password", "utf-8")
        refused = check_destination("web", _destination(orthanc, tmp_path / "wrong"),
                                    calling_ae=NODE_AET, settings=settings.dispatch)
        assert not refused.ok and "HTTP 401" in refused.detail, refused.detail

        database = open_database(settings.database.url)
        try:
            paths = _results(tmp_path / "out")
            dispatcher = Dispatcher(settings, database)
            _enqueue(dispatcher, database, paths)
            assert _drain(dispatcher, database) == [DeliveryState.SENT] * 2
        finally:
            database.dispose()
        held = {}
        for orthanc_id in orthanc.instance_ids():
            copy = orthanc.download(orthanc_id, tmp_path / f"{orthanc_id}.dcm")
            held[_uid(copy)] = dataset_bytes(copy)
        assert held == {_uid(p): dataset_bytes(p) for p in paths}
    finally:
        orthanc.stop()


def test_outage_is_retried_then_failed_and_an_operator_retry_delivers_once(
    tmp_path: Path
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port(), dicomweb=True,
                      users={USER: PASSWORD})
    (tmp_path / "pw").write_text(PASSWORD, "utf-8")
    settings = _settings(tmp_path, _destination(orthanc, tmp_path / "pw"), max_attempts=2)
    database = open_database(settings.database.url)
    try:
        paths = _results(tmp_path / "out")
        dispatcher = Dispatcher(settings, database)
        _enqueue(dispatcher, database, paths)
        # Nothing listens yet: the first attempt schedules a retry, the second is the last.
        first = dispatcher.run_once()
        assert (first.sent, first.retrying) == (0, 2)
        rows = outbox.list_deliveries(database)
        assert all("could not reach" in str(r["last_error"]) for r in rows), rows
        assert _drain(dispatcher, database) == [DeliveryState.FAILED] * 2
        orthanc.start()
        try:
            assert orthanc.instance_ids() == []
            assert len(outbox.retry(database, all_failed=True)) == 2
            assert _drain(dispatcher, database) == [DeliveryState.SENT] * 2
            # A further pass sends nothing again.
            assert dispatcher.run_once().claimed == 0
            assert sorted(orthanc.sop_instance_uids()) == sorted(_uid(p) for p in paths)
        finally:
            orthanc.stop()
    finally:
        database.dispose()

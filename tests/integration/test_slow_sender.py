"""The quiet period never completes a study while the association that stores into it is
still open: a real node and a pynetdicom sender that pauses between the two eyes."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Study
from tests.support.dicom_files import write_study
from tests.support.node import NODE_AE, NodeProcess, write_config

pytestmark = pytest.mark.integration

QUIET = 1.0


def test_a_pause_longer_than_the_quiet_period_inside_one_association(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    config = write_config(tmp_path, url,
                          completeness={"quiet_seconds": QUIET, "sweep_seconds": 0.3})
    study_uid, files = write_study(tmp_path / "study")
    datasets = [pydicom.dcmread(path) for path in files]
    database = Database(url)
    try:
        with NodeProcess(config) as node:
            ae = AE(ae_title="CAM1")
            ae.add_requested_context(datasets[0].SOPClassUID,
                                     datasets[0].file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
            assert assoc.is_established
            try:
                assert assoc.send_c_store(datasets[0]).Status == 0x0000
                time.sleep(QUIET * 2.5)  # several quiet periods and sweeps go by
                with database.transaction() as session:
                    mid = session.scalar(select(Study.state)
                                         .where(Study.study_uid == study_uid))
                assert assoc.send_c_store(datasets[1]).Status == 0x0000
            finally:
                assoc.release()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with database.transaction() as session:
                    study = session.scalars(select(Study)
                                            .where(Study.study_uid == study_uid)).one()
                if study.completed_at is not None:
                    break
                time.sleep(0.1)
            log = node.log()
        with database.transaction() as session:
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            late = session.scalars(select(Instance.late)
                                   .where(Instance.study_id == study.id)).all()
    finally:
        database.dispose()
    assert mid == "receiving", f"completed while its sender was still connected:\n{log}"
    assert late == [False, False]
    assert study.completed_at is not None and study.completed_reason == "expected-content"
    assert not study.needs_reprocess


def test_one_eye_completes_when_its_association_ends_after_the_quiet_period(
    tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    # A long sweep: completion must come from the end of the association itself.
    config = write_config(tmp_path, url,
                          completeness={"quiet_seconds": QUIET, "sweep_seconds": 60})
    study_uid, files = write_study(tmp_path / "study", lateralities="R")
    ds = pydicom.dcmread(files[0])
    database = Database(url)
    try:
        with NodeProcess(config) as node:
            ae = AE(ae_title="CAM1")
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
            assert assoc.is_established
            assert assoc.send_c_store(ds).Status == 0x0000
            time.sleep(QUIET * 2.5)
            with database.transaction() as session:
                mid = session.scalar(select(Study.state).where(Study.study_uid == study_uid))
            assoc.release()
            ended = time.monotonic()
            state = mid
            while time.monotonic() < ended + 5 and state == "receiving":
                time.sleep(0.05)
                with database.transaction() as session:
                    state = session.scalar(select(Study.state)
                                           .where(Study.study_uid == study_uid))
            waited = time.monotonic() - ended
    finally:
        database.dispose()
    assert mid == "receiving"
    assert state != "receiving" and waited < 2.5


def test_a_long_association_that_moved_on_does_not_hold_back_earlier_studies(
    tmp_path: Path
) -> None:
    """A router forwarding study after study over one association: a study it is no longer
    sending completes after its quiet period; the one it is sending still waits."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    config = write_config(tmp_path, url,
                          completeness={"quiet_seconds": QUIET, "sweep_seconds": 0.3})
    first, first_files = write_study(tmp_path / "first", lateralities="R")
    second, second_files = write_study(tmp_path / "second", lateralities="R")
    datasets = [pydicom.dcmread(first_files[0]), pydicom.dcmread(second_files[0])]
    database = Database(url)

    def states() -> dict[str, str]:
        with database.transaction() as session:
            return dict(session.execute(select(Study.study_uid, Study.state)).all())

    try:
        with NodeProcess(config) as node:
            ae = AE(ae_title="ROUTER")
            ae.add_requested_context(datasets[0].SOPClassUID,
                                     datasets[0].file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
            assert assoc.is_established
            try:
                for ds in datasets:
                    assert assoc.send_c_store(ds).Status == 0x0000
                deadline = time.monotonic() + QUIET * 8
                while time.monotonic() < deadline and states().get(first) == "receiving":
                    time.sleep(0.1)
                mid = states()
            finally:
                assoc.release()
            log = node.log()
    finally:
        database.dispose()
    assert mid[first] != "receiving", f"held back by an association that moved on:\n{log}"
    assert mid[second] == "receiving"

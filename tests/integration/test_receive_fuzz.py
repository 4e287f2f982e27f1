"""Never stalls, never lies: mutated instances over real associations, then a good study.

A bounded, seeded mutation loop sends malformed variants of a synthetic OP image from a
pynetdicom sender (raw bytes from the file: storescu cannot send most of them), each under its
own study. Whatever the node makes of each (refused, or stored and then failed or processed),
the good two-eye study sent afterwards with DCMTK storescu must complete, run, and reach
Orthanc; no study may be left stuck, and no synthetic patient name may reach the node's log
or the audit trail.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Study
from dicomnode.receive import statuses
from tests.support.dicom_files import dataset_bytes, write_op, write_study
from tests.support.executor_fixtures import write_fuzz_screening
from tests.support.mutate import random_mutant
from tests.support.node import NODE_AE, NodeProcess, results_delivered, write_config
from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port, require_tool

pytestmark = pytest.mark.integration

MUTANTS = 40
SEED = 14
FUZZ_NAME = "Fuzzed^Patient"
GOOD_NAME = "Wellsent^Patient"
_FINAL = {"done", "partial", "failed", "not-routed"}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "pacs", free_port(), free_port())
    yield peer
    peer.stop()


def _wait(what: str, predicate: Callable[[], bool], timeout: float,
          log: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    if not predicate():
        pytest.fail(f"timed out waiting for {what}; node log:\n{log()[-6000:]}")


class _Sender:
    """A pynetdicom association that sends files' data set bytes as they are."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = AE(ae_title="FUZZER")
        self.ae.add_requested_context(pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.77.1.5.1"),
                                      pydicom.uid.ExplicitVRLittleEndian)
        self.assoc: Any = None

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
            assert self.assoc.is_established, "the node stopped accepting associations"
        status = self.assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def test_mutated_instances_never_stall_the_good_study(
    tmp_path: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch
) -> None:
    storescu = require_tool("storescu", "dcmtk")
    orthanc.start()
    registry, presets = write_fuzz_screening(tmp_path, "fuzz test")
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    config = write_config(
        tmp_path, db_url,
        completeness={"quiet_seconds": 0.5, "sweep_seconds": 0.5},
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        registry={"path": str(registry)}, presets={"path": str(presets)},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.2},
        dispatch={"poll_seconds": 0.2, "first_delay_seconds": 0.5, "max_attempts": 20},
    )
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    rng = random.Random(SEED)
    template_path = write_op(tmp_path / "template.dcm", size=64)
    database = Database(db_url)
    answers: dict[str, int | None] = {}
    try:
        with NodeProcess(config) as node:
            sender = _Sender(node.port)
            try:
                for index in range(MUTANTS):
                    ds = pydicom.dcmread(template_path)
                    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    ds.PatientName = f"{FUZZ_NAME}{index:02d}"
                    ds.save_as(tmp_path / "clean.dcm", enforce_file_format=True)
                    raw = (tmp_path / "clean.dcm").read_bytes()
                    body = dataset_bytes(tmp_path / "clean.dcm")
                    path = tmp_path / f"mutant-{index:02d}.dcm"
                    path.write_bytes(raw[:len(raw) - len(body)] + random_mutant(body, rng))
                    answers[path.name] = sender.send(path)
            finally:
                sender.close()
            # The node still answers, and the good study goes through end to end.
            study_uid, files = write_study(tmp_path / "good", size=64, patient_id="GOOD01")
            for path in files:
                ds = pydicom.dcmread(path)
                ds.PatientName = GOOD_NAME
                ds.save_as(path, enforce_file_format=True)
            sent = subprocess.run(
                [storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1", str(node.port),
                 *map(str, files)], capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr

            def delivered() -> bool:
                with database.transaction() as session:
                    return results_delivered(session, study_uid)

            _wait("the good study delivered", delivered, 60, node.log)

            def settled() -> bool:
                with database.transaction() as session:
                    states = session.scalars(select(Study.state)).all()
                return all(s in _FINAL for s in states)

            _wait("every stored study in a final state", settled, 30, node.log)
            log = node.log()
        with database.transaction() as session:
            states = dict(session.execute(select(Study.study_uid, Study.state)).all())
            audit_text = " ".join(d or "" for d in session.scalars(select(AuditEvent.detail)))
    finally:
        database.dispose()
    refused = [name for name, status in answers.items() if status != statuses.SUCCESS]
    assert refused, "no mutant was refused: the mutations did not bite"
    assert all(status != statuses.PROCESSING_FAILURE for status in answers.values()), answers
    assert states[study_uid] == "done"
    assert sum(1 for uid in orthanc.sop_instance_uids()) >= 3  # SR + one SEG per eye
    for name in (FUZZ_NAME, GOOD_NAME, "Fuzzed", "Wellsent"):
        assert name not in log, f"{name!r} in the node's log"
        assert name not in audit_text, f"{name!r} in the audit trail"

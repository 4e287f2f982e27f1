"""The C-STORE handler's guard rails, driven with a stand-in pynetdicom event."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta
from sqlalchemy import select

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Instance, Study
from dicomnode.receive import ingest, statuses
from dicomnode.receive.handlers import ReceiveHandlers
from dicomnode.settings import Settings, StorageSettings
from tests.support.dicom_files import dataset_bytes, write_op


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    database = open_database(db_url)
    yield database
    database.dispose()


class _Association:
    """Hashable, like pynetdicom's: the handlers key per-association state on it."""

    requestor = SimpleNamespace(ae_title="CAM1", address="127.0.0.1")


def _event(path: Path) -> Any:
    import pydicom

    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = False, True
    write_dataset(buffer, ds)
    request = SimpleNamespace(
        DataSet=BytesIO(buffer.getvalue()),
        AffectedSOPClassUID=ds.SOPClassUID,
        AffectedSOPInstanceUID=ds.SOPInstanceUID,
    )
    assoc = _Association()
    return SimpleNamespace(
        assoc=assoc,
        request=request,
        context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian),
        file_meta=create_file_meta(sop_class_uid=ds.SOPClassUID,
                                   sop_instance_uid=ds.SOPInstanceUID,
                                   transfer_syntax=ExplicitVRLittleEndian),
    )


def _handlers(database: Database, tmp_path: Path, **storage: Any) -> ReceiveHandlers:
    settings = Settings(storage=StorageSettings(path=tmp_path / "storage", **storage))
    (tmp_path / "storage").mkdir()
    return ReceiveHandlers(settings, database)


def _kinds(database: Database) -> list[tuple[str, int | None]]:
    with database.transaction() as session:
        return [(e.kind, e.status) for e in session.scalars(select(AuditEvent))]


def test_store_writes_file_then_row(database: Database, tmp_path: Path) -> None:
    sent = write_op(tmp_path / "in.dcm")
    handlers = _handlers(database, tmp_path, min_free_mb=0)
    assert handlers.on_store(_event(sent)) == statuses.SUCCESS
    with database.transaction() as session:
        rel = session.scalar(select(Instance.path))
    assert rel is not None
    assert dataset_bytes(tmp_path / "storage" / rel) == dataset_bytes(sent)
    assert _kinds(database) == [("arrived", 0)]


def test_low_disk_is_out_of_resources(database: Database, tmp_path: Path) -> None:
    handlers = _handlers(database, tmp_path, min_free_mb=10**12)
    status = handlers.on_store(_event(write_op(tmp_path / "in.dcm")))
    assert status == statuses.OUT_OF_RESOURCES
    assert _kinds(database) == [("refused", statuses.OUT_OF_RESOURCES)]
    assert not list((tmp_path / "storage").iterdir())


def test_unexpected_error_is_a_failure_status_and_audited(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handlers = _handlers(database, tmp_path, min_free_mb=0)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ingest, "record_arrival", broken)
    assert handlers.on_store(_event(write_op(tmp_path / "a.dcm"))) == statuses.PROCESSING_FAILURE
    assert _kinds(database) == [("error", statuses.PROCESSING_FAILURE)]
    assert handlers.in_flight.count == 0
    monkeypatch.undo()
    # The same handler object goes on serving.
    assert handlers.on_store(_event(write_op(tmp_path / "b.dcm"))) == statuses.SUCCESS


def _variant(path: Path, target: Path, **changes: object) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_the_same_instance_sent_twice_at_once_never_replaces_the_committed_file(
    database: Database, tmp_path: Path
) -> None:
    import threading

    handlers = _handlers(database, tmp_path, min_free_mb=0)
    for attempt in range(12):
        first = write_op(tmp_path / f"a{attempt}.dcm")
        # Same SOP Instance UID, other content (and another size).
        second = _variant(first, tmp_path / f"b{attempt}.dcm", ImageComments="x" * 400)
        events = [_event(first), _event(second)]
        barrier = threading.Barrier(2)
        answers: list[int] = []

        def send(event: Any, barrier: threading.Barrier, answers: list[int]) -> None:
            barrier.wait()
            answers.append(handlers.on_store(event))

        threads = [threading.Thread(target=send, args=(e, barrier, answers)) for e in events]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [statuses.SUCCESS, statuses.SUCCESS]
        with database.transaction() as session:
            row = session.scalars(select(Instance).order_by(Instance.id.desc())).first()
        assert row is not None
        stored = tmp_path / "storage" / row.path
        assert stored.stat().st_size == row.size_bytes, f"attempt {attempt}: file replaced"
        assert dataset_bytes(stored) in (dataset_bytes(first), dataset_bytes(second))


def test_a_sop_instance_uid_held_under_another_study_is_refused_without_traces(
    database: Database, tmp_path: Path
) -> None:
    handlers = _handlers(database, tmp_path, min_free_mb=0)
    first = write_op(tmp_path / "a.dcm")
    assert handlers.on_store(_event(first)) == statuses.SUCCESS
    other = _variant(first, tmp_path / "b.dcm", StudyInstanceUID="1.2.3.4.5.6")
    assert handlers.on_store(_event(other)) == statuses.DUPLICATE_SOP_INSTANCE
    with database.transaction() as session:
        studies = session.scalars(select(Study.study_uid)).all()
    assert "1.2.3.4.5.6" not in studies and len(studies) == 1
    assert not (tmp_path / "storage" / "1.2.3.4.5.6").exists()
    assert _kinds(database) == [("arrived", 0), ("refused", statuses.DUPLICATE_SOP_INSTANCE)]


def test_an_instance_over_the_size_limit_is_refused_and_audited(
    database: Database, tmp_path: Path
) -> None:
    handlers = _handlers(database, tmp_path, min_free_mb=0, max_instance_mb=1)
    small = write_op(tmp_path / "small.dcm", size=96)
    big = write_op(tmp_path / "big.dcm", size=700)  # 700 x 700 RGB: about 1.4 MB
    assert handlers.on_store(_event(big)) == statuses.OUT_OF_RESOURCES
    assert handlers.on_store(_event(small)) == statuses.SUCCESS  # the node is unharmed
    with database.transaction() as session:
        details = session.scalars(select(AuditEvent.detail)
                                  .where(AuditEvent.kind == "refused")).all()
        stored = session.scalars(select(Instance.sop_instance_uid)).all()
    assert len(details) == 1 and "storage.max_instance_mb" in (details[0] or "")
    assert len(stored) == 1
    assert _kinds(database)[0] == ("refused", statuses.OUT_OF_RESOURCES)


@pytest.mark.parametrize("value", [b"AB\x00CD", b"\x1b$B\x00\x00"])
def test_control_characters_in_an_identifier_are_no_processing_failure(
    database: Database, tmp_path: Path, value: bytes
) -> None:
    """A NUL inside Patient ID under a mistyped character set used to reach PostgreSQL,
    which refuses it: 0x0110. The identifier keeps its printable characters."""
    from tests.support.mutate import put

    handlers = _handlers(database, tmp_path, min_free_mb=0)
    path = write_op(tmp_path / "a.dcm")
    raw = path.read_bytes()
    body = dataset_bytes(path)
    meta = raw[: len(raw) - len(body)]
    path.write_bytes(meta + put(put(body, 0x00100020, "LO", value),
                                0x00080005, "CS", b"ISO 2022 IR 87"))
    assert handlers.on_store(_event(path)) == statuses.SUCCESS
    with database.transaction() as session:
        [patient_id] = session.scalars(select(Study.patient_id)).all()
    assert patient_id is None or patient_id.isprintable()


# -- data sets streamed to disk (pynetdicom's STORE_RECV_CHUNKED_DATASET) ----------------


def _streamed_event(path: Path, storage: Path, *, version: str | None = None) -> Any:
    """An event whose data set pynetdicom streamed to a file in `storage`/.incoming, as it
    writes one: preamble, its File Meta Information, the data set as sent."""
    from pydicom.filewriter import write_file_meta_info

    event = _event(path)
    meta = create_file_meta(sop_class_uid=event.request.AffectedSOPClassUID,
                            sop_instance_uid=event.request.AffectedSOPInstanceUID,
                            transfer_syntax=ExplicitVRLittleEndian)
    if version is not None:
        meta.ImplementationVersionName = version
    incoming = storage / ".incoming"
    incoming.mkdir(exist_ok=True)
    received = incoming / f".in-{path.stem}.tmp"
    with received.open("wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(handle, meta)  # type: ignore[arg-type]
        handle.write(event.request.DataSet.getvalue())
    event.request.DataSet = BytesIO()  # streamed: nothing in memory
    event.dataset_path = received
    return event


def _node_meta(event: Any) -> bytes:
    from pynetdicom.dsutils import encode_file_meta

    return b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)


def test_a_streamed_data_set_is_renamed_into_place(database: Database, tmp_path: Path) -> None:
    sent = write_op(tmp_path / "in.dcm")
    handlers = _handlers(database, tmp_path, min_free_mb=0)
    event = _streamed_event(sent, tmp_path / "storage")
    inode = event.dataset_path.stat().st_ino
    assert handlers.on_store(event) == statuses.SUCCESS
    with database.transaction() as session:
        row = session.scalars(select(Instance)).one()
    stored = tmp_path / "storage" / row.path
    assert stored.stat().st_ino == inode  # the same file, not a copy
    assert not event.dataset_path.exists()
    assert stored.read_bytes() == _node_meta(event) + dataset_bytes(sent)
    assert row.size_bytes == stored.stat().st_size
    assert _kinds(database) == [("arrived", 0)]


def test_a_streamed_data_set_with_other_file_meta_is_stored_with_the_nodes(
        database: Database, tmp_path: Path) -> None:
    sent = write_op(tmp_path / "in.dcm")
    handlers = _handlers(database, tmp_path, min_free_mb=0)
    event = _streamed_event(sent, tmp_path / "storage", version="OTHER_1.0")
    assert handlers.on_store(event) == statuses.SUCCESS
    with database.transaction() as session:
        rel = session.scalar(select(Instance.path))
    assert rel is not None
    assert (tmp_path / "storage" / rel).read_bytes() == _node_meta(event) + dataset_bytes(sent)
    assert event.dataset_path.exists()  # copied; pynetdicom deletes its file itself


def test_a_streamed_data_set_is_checked_as_one_in_memory(
        database: Database, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    handlers = _handlers(database, tmp_path, min_free_mb=0, max_instance_mb=1)
    big = _streamed_event(write_op(tmp_path / "big.dcm", size=700), storage)
    assert handlers.on_store(big) == statuses.OUT_OF_RESOURCES
    truncated = _streamed_event(write_op(tmp_path / "cut.dcm"), storage)
    with truncated.dataset_path.open("r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 10)
    assert handlers.on_store(truncated) == statuses.UNPARSEABLE
    first = write_op(tmp_path / "a.dcm")
    assert handlers.on_store(_streamed_event(first, storage)) == statuses.SUCCESS
    elsewhere = _variant(first, tmp_path / "b.dcm", StudyInstanceUID="1.2.3.4.5.6")
    assert handlers.on_store(_streamed_event(elsewhere, storage)) == \
        statuses.DUPLICATE_SOP_INSTANCE
    assert handlers.on_store(_streamed_event(first, storage)) == statuses.SUCCESS  # again
    assert [kind for kind, _status in _kinds(database)] == \
        ["refused", "refused", "arrived", "refused", "duplicate"]
    import pydicom

    study = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    assert sorted(p.name for p in storage.iterdir()) == [".incoming", study]


def test_a_dropped_connection_while_looking_the_instance_up_is_retried(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak with a flapping PostgreSQL: a connection killed during the first lookup of a
    C-STORE answered 0x0110; a transient error there is retried like the insert is."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    real = ingest.held_path
    calls: list[int] = []

    def flaky(db: Database, uid: str) -> str | None:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked"))
        return real(db, uid)

    monkeypatch.setattr(ingest, "held_path", flaky)
    handlers = _handlers(database, tmp_path, min_free_mb=0)
    assert handlers.on_store(_event(write_op(tmp_path / "in.dcm"))) == statuses.SUCCESS
    assert len(calls) == 2
    with database.transaction() as session:
        assert session.scalar(select(Instance.path)) is not None


def test_a_refusal_keeps_its_audit_row_over_a_dropped_connection(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soak: 14 of 1,868 refusals had no audit row, their write met a cut connection."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from dicomnode.db import audit

    real = audit.record
    calls: list[str] = []

    def flaky(session: Any, kind: str, **fields: Any) -> Any:
        calls.append(kind)
        if len(calls) == 1:
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
        return real(session, kind, **fields)

    monkeypatch.setattr(audit, "record", flaky)
    handlers = _handlers(database, tmp_path, min_free_mb=0)
    handlers.acceptor.audit("refused", status=0xC210, detail="test")
    assert calls == ["refused", "refused"]
    assert _kinds(database) == [("refused", 0xC210)]


def test_receiving_changed_reports_the_studies_being_sent(database: Database,
                                                          tmp_path: Path) -> None:
    """What a receiving worker process tells the main one's assembler (receive/workers.py):
    the study an open association is sending, and nothing once it has ended."""
    import pydicom

    handlers = _handlers(database, tmp_path, min_free_mb=0)
    reports: list[frozenset[str]] = []
    handlers.receiving_changed = reports.append
    sent = write_op(tmp_path / "a.dcm")
    event = _event(sent)
    assert handlers.on_store(event) == statuses.SUCCESS
    study = str(pydicom.dcmread(sent).StudyInstanceUID)
    assert reports == [frozenset({study})]
    again = _event(write_op(tmp_path / "b.dcm", study_uid=study))
    again.assoc = event.assoc  # the same association
    assert handlers.on_store(again) == statuses.SUCCESS
    assert len(reports) == 1  # the same study again: no change to report
    handlers.on_ended(SimpleNamespace(assoc=event.assoc))
    assert reports == [frozenset({study}), frozenset()]

"""The receiver against real peers over loopback: DCMTK echoscu/storescu, a pynetdicom SCU.

One node process per database kind serves the whole module (start-up costs seconds).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, RLELossless
from pynetdicom import AE, _config
from sqlalchemy import func, select

from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Instance
from dicomnode.receive import statuses
from dicomnode.receive.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from tests.support.databases import database_url
from tests.support.dicom_files import dataset_bytes, write_op, write_study
from tests.support.node import NODE_AE, NodeProcess, write_config
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration

CALLER = "CAM1"


@dataclass
class Env:
    node: NodeProcess
    database: Database
    work: Path


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Env]:
    work = tmp_path_factory.mktemp(f"receive-{request.param}")
    with database_url(request.param, work) as url:
        config = write_config(
            work, url,
            callers=[{"ae_title": CALLER}, {"ae_title": "HOSTBOUND", "host": "10.255.255.1"}],
            # Long quiet period: nothing here should complete behind the tests' backs.
            completeness={"quiet_seconds": 600},
        )
        with NodeProcess(config) as node:
            database = Database(url)
            try:
                yield Env(node, database, work)
            finally:
                database.dispose()


def storescu(env: Env, *files: Path, calling: str = CALLER, called: str = NODE_AE,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu", "dcmtk")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(env.node.port),
         *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )


def stored_path(env: Env, sop_instance_uid: str) -> Path:
    with env.database.transaction() as session:
        rel = session.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
        )
    assert rel is not None, f"no row for {sop_instance_uid}"
    return env.node.storage / rel


def instance_count(env: Env, sop_instance_uid: str) -> int:
    with env.database.transaction() as session:
        return int(session.scalar(
            select(func.count()).select_from(Instance)
            .where(Instance.sop_instance_uid == sop_instance_uid)
        ) or 0)


def audit_kinds(env: Env, sop_instance_uid: str) -> list[str]:
    with env.database.transaction() as session:
        return list(session.scalars(
            select(AuditEvent.kind).where(AuditEvent.sop_instance_uid == sop_instance_uid)
            .order_by(AuditEvent.id)
        ))


def test_echoscu(env: Env) -> None:
    exe = require_tool("echoscu", "dcmtk")
    result = subprocess.run([exe, "-aet", CALLER, "-aec", NODE_AE, "127.0.0.1",
                             str(env.node.port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_uncompressed_lands_byte_identical(env: Env, tmp_path: Path) -> None:
    _study, files = write_study(tmp_path)
    result = storescu(env, *files)
    assert result.returncode == 0, result.stderr
    for sent in files:
        uid = pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID
        stored = stored_path(env, uid)
        assert dataset_bytes(stored) == dataset_bytes(sent)
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == \
            pydicom.dcmread(sent).file_meta.TransferSyntaxUID
        assert audit_kinds(env, uid) == ["arrived"]


@pytest.mark.parametrize(
    ("tool", "tool_args", "propose", "syntax"),
    [
        ("dcmcjpeg", ("+eb",), "-xy", JPEGBaseline8Bit),
        ("dcmcjpeg", (), "-xs", JPEGLosslessSV1),
        ("dcmcrle", (), "-xr", RLELossless),
    ],
)
def test_compressed_lands_byte_identical(env: Env, tmp_path: Path, tool: str,
                                         tool_args: tuple[str, ...], propose: str,
                                         syntax: str) -> None:
    exe = require_tool(tool, "dcmtk")
    source = write_op(tmp_path / "plain.dcm", size=128)
    sent = tmp_path / "compressed.dcm"
    subprocess.run([exe, *tool_args, str(source), str(sent)], check=True, capture_output=True)
    sent_ds = pydicom.dcmread(sent)
    assert sent_ds.file_meta.TransferSyntaxUID == syntax
    result = storescu(env, sent, extra=(propose,))
    assert result.returncode == 0, result.stderr
    stored = stored_path(env, sent_ds.SOPInstanceUID)
    assert dataset_bytes(stored) == dataset_bytes(sent)
    stored_ds = pydicom.dcmread(stored)
    assert stored_ds.file_meta.TransferSyntaxUID == syntax
    assert stored_ds.pixel_array.shape == (128, 128, 3)  # decodes as received


def test_every_documented_class_and_syntax_is_accepted(env: Env) -> None:
    ae = AE(ae_title=CALLER)
    for sop_class in STORAGE_SOP_CLASSES:
        for syntax in TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", env.node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                    for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert accepted == {(c, t) for c in STORAGE_SOP_CLASSES for t in TRANSFER_SYNTAXES}
    assert len(STORAGE_SOP_CLASSES) == 7 and len(TRANSFER_SYNTAXES) == 8


def test_unknown_caller_rejected(env: Env, tmp_path: Path) -> None:
    sent = write_op(tmp_path / "x.dcm")
    result = storescu(env, sent, calling="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr
    # An allowed AE title from the wrong host is refused too.
    result = storescu(env, sent, calling="HOSTBOUND")
    assert "Calling AE Title Not Recognized" in result.stderr
    assert instance_count(env, pydicom.dcmread(sent).SOPInstanceUID) == 0
    with env.database.transaction() as session:
        rejected = session.scalars(
            select(AuditEvent.calling_ae).where(AuditEvent.kind == "association-rejected")
        ).all()
    assert {"INTRUDER", "HOSTBOUND"} <= set(rejected)


def test_wrong_called_ae_rejected(env: Env) -> None:
    exe = require_tool("echoscu", "dcmtk")
    result = subprocess.run([exe, "-aet", CALLER, "-aec", "NOTTHENODE", "127.0.0.1",
                             str(env.node.port)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_duplicate_is_idempotent(env: Env, tmp_path: Path) -> None:
    sent = write_op(tmp_path / "dup.dcm")
    uid = pydicom.dcmread(sent).SOPInstanceUID
    for _ in range(2):
        result = storescu(env, sent)
        assert result.returncode == 0, result.stderr
    assert instance_count(env, uid) == 1
    assert audit_kinds(env, uid) == ["arrived", "duplicate"]


def _pynetdicom_store(env: Env, path: Path) -> int:
    """Send a file's data set bytes unparsed, as a broken device would."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # send from the file, not a re-encoded Dataset
    meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", env.node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def _with_body(template: Path, body: bytes, target: Path) -> Path:
    raw = template.read_bytes()
    target.write_bytes(raw[: len(raw) - len(dataset_bytes(template))] + body)
    return target


def test_garbled_data_refused_and_node_keeps_serving(env: Env, tmp_path: Path) -> None:
    good = write_op(tmp_path / "good.dcm")
    body = dataset_bytes(good)
    garbled = [
        _with_body(good, body[: len(body) // 2], tmp_path / "truncated.dcm"),
        _with_body(good, bytes(range(256)) * 40, tmp_path / "noise.dcm"),
    ]
    for path in garbled:
        assert _pynetdicom_store(env, path) == statuses.UNPARSEABLE
    uid = pydicom.dcmread(good).SOPInstanceUID
    assert "refused" in audit_kinds(env, uid)
    assert instance_count(env, uid) == 0
    # Still serving, and the intact file is accepted afterwards.
    assert _pynetdicom_store(env, good) == statuses.SUCCESS
    assert instance_count(env, uid) == 1


@pytest.mark.parametrize(
    ("keyword", "value", "status"),
    [
        ("StudyInstanceUID", None, statuses.MISSING_UID),
        ("SeriesInstanceUID", "1.2.03.x", statuses.MALFORMED_UID),
        ("SOPInstanceUID", "1.2.3.4", statuses.SOP_INSTANCE_MISMATCH),
    ],
)
def test_bad_identifiers_refused(env: Env, tmp_path: Path, keyword: str, value: str | None,
                                 status: int) -> None:
    path = write_op(tmp_path / "bad.dcm")
    ds = pydicom.dcmread(path)
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=False)  # file meta keeps the original SOP Instance
    assert _pynetdicom_store(env, path) == status
    assert instance_count(env, ds.file_meta.MediaStorageSOPInstanceUID) == 0


def test_native_pixels_under_a_jpeg_syntax_are_refused(env: Env, tmp_path: Path) -> None:
    """A sender that labels uncompressed pixel data JPEG Baseline: refused at receive (the
    job would fail on it later), not stored."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    good = write_op(tmp_path / "native.dcm")
    ds = pydicom.dcmread(good, stop_before_pixels=True)
    meta = DicomBytesIO()
    write_file_meta_info(meta, create_file_meta(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax=JPEGBaseline8Bit))
    mislabelled = tmp_path / "mislabelled.dcm"
    mislabelled.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + dataset_bytes(good))
    assert _pynetdicom_store(env, mislabelled) == statuses.UNPARSEABLE
    assert instance_count(env, ds.SOPInstanceUID) == 0
    assert audit_kinds(env, ds.SOPInstanceUID) == ["refused"]

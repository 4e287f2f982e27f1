"""A data set far larger than the node's memory growth: streamed to disk as it arrives.

DCMTK's storescu sends a 200 MB Ophthalmic Photography image to a real node process. The
node's peak resident memory (VmHWM) must grow by a fraction of that (it grew by about four
times the data set when pynetdicom gathered it in memory), the data set must be stored byte
for byte with the File Meta Information the node always wrote, and pynetdicom's temporary
file must have lived in the storage folder (so storing it was a rename) and be gone after.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Instance
from dicomnode.receive.streamed import INCOMING
from tests.support.databases import database_url
from tests.support.dicom_files import write_op
from tests.support.node import NODE_AE, NodeProcess, write_config
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration

CALLER = "CAM1"
_SIDE = 8192  # 8192 x 8192 RGB: 192 MiB of pixel data
_CHUNK = 1024 * 1024


def _large_op(path: Path, side: int = _SIDE) -> Path:
    """An OP image of side x side RGB written a chunk at a time (the test stays small)."""
    small = write_op(path.with_name("small.dcm"), size=64)
    ds = pydicom.dcmread(small)
    del ds.PixelData
    ds.Rows = ds.Columns = side
    ds.save_as(path, enforce_file_format=True)
    length = side * side * 3
    with path.open("ab") as handle:  # Pixel Data is the last element: append it
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length))
        for _ in range(length // _CHUNK):
            handle.write(os.urandom(_CHUNK))
    return path


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeProcess, Database]]:
    with database_url("sqlite", tmp_path) as url:
        config = write_config(tmp_path, url, callers=[{"ae_title": CALLER}],
                              completeness={"quiet_seconds": 600})
        with NodeProcess(config) as process:
            database = Database(url)
            try:
                yield process, database
            finally:
                database.dispose()


def _storescu(node: NodeProcess, path: Path, *options: str) -> subprocess.Popen[str]:
    exe = require_tool("storescu", "dcmtk")
    return subprocess.Popen(
        [exe, *options, "-aet", CALLER, "-aec", NODE_AE, "127.0.0.1", str(node.port),
         str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_large_data_set_is_streamed_to_storage_not_held_in_memory(
        node: tuple[NodeProcess, Database], tmp_path: Path) -> None:
    process, database = node
    assert process.proc is not None
    # A first small store loads what the receive path imports lazily, before the baseline.
    warm = _storescu(process, write_op(tmp_path / "warm.dcm"))
    assert warm.wait(timeout=60) == 0, warm.communicate()[1]
    sent = _large_op(tmp_path / "large.dcm")
    size_kb = sent.stat().st_size // 1024
    before = _peak_rss_kb(process.proc.pid)

    incoming = process.storage / INCOMING
    seen: set[str] = set()
    sender = _storescu(process, sent)
    deadline = time.monotonic() + 180
    while sender.poll() is None and time.monotonic() < deadline:
        seen.update(p.name for p in incoming.iterdir())
        time.sleep(0.01)
    _out, err = sender.communicate(timeout=10)
    assert sender.returncode == 0, err
    growth = _peak_rss_kb(process.proc.pid) - before

    assert growth < size_kb // 4, (
        f"peak RSS grew by {growth // 1024} MiB for a {size_kb // 1024} MiB data set")
    # pynetdicom's temporary file was in the storage folder, named for the start-up sweep,
    # and nothing of it is left.
    assert seen and all(n.startswith(".") and n.endswith(".tmp") for n in seen), seen
    assert not list(incoming.iterdir())

    header = pydicom.dcmread(sent, stop_before_pixels=True)
    with database.transaction() as session:
        relative = session.scalar(select(Instance.path).where(
            Instance.sop_instance_uid == header.SOPInstanceUID))
    assert relative is not None
    stored = process.storage / relative
    meta = b"\x00" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=header.SOPClassUID, sop_instance_uid=header.SOPInstanceUID,
        transfer_syntax=ExplicitVRLittleEndian))
    with stored.open("rb") as handle:
        assert handle.read(len(meta)) == meta  # the File Meta the node has always written
    assert _data_set_digest(stored) == _data_set_digest(sent)


def _data_set_digest(path: Path) -> str:
    """SHA-256 of the data set (after the File Meta), read a chunk at a time."""
    with path.open("rb") as handle:
        read_preamble(handle, False)
        _read_file_meta_info(handle)
        return hashlib.file_digest(handle, "sha256").hexdigest()


def test_a_data_set_over_the_size_limit_never_fills_the_disk(tmp_path: Path) -> None:
    """storage.max_instance_mb = 2 and a 48 MiB image: the streamed file never holds more
    than the limit (it is emptied as the limit passes), the instance is refused with Out of
    Resources and a size the audit gives, and the node goes on storing."""
    with database_url("sqlite", tmp_path) as url:
        config = write_config(tmp_path, url, callers=[{"ae_title": CALLER}],
                              storage={"max_instance_mb": 2},
                              completeness={"quiet_seconds": 600})
        with NodeProcess(config) as process:
            database = Database(url)
            try:
                sent = _large_op(tmp_path / "large.dcm", side=4096)
                incoming = process.storage / INCOMING
                largest = 0
                sender = _storescu(process, sent, "-v")
                deadline = time.monotonic() + 120
                while sender.poll() is None and time.monotonic() < deadline:
                    for path in incoming.glob("*.tmp"):
                        with contextlib.suppress(FileNotFoundError):
                            largest = max(largest, path.stat().st_size)
                    time.sleep(0.005)
                out, err = sender.communicate(timeout=10)
                assert "Refused: OutOfResources" in out + err, out + err  # 0xA7xx
                assert 0 < largest <= 2 * 1024 * 1024 + 64 * 1024, largest
                with database.transaction() as session:
                    refused = session.scalars(select(AuditEvent.detail).where(
                        AuditEvent.kind == "refused")).all()
                    assert session.scalar(select(Instance.id)) is None
                [detail] = refused
                assert detail is not None and "storage.max_instance_mb (2 MB)" in detail, detail
                assert "48.0 MB" in detail
                assert not list(incoming.glob("*.tmp"))
                small = _storescu(process, write_op(tmp_path / "small.dcm"))
                assert small.wait(timeout=60) == 0, small.communicate()[1]
                with database.transaction() as session:
                    assert session.scalar(select(Instance.id)) is not None
            finally:
                database.dispose()

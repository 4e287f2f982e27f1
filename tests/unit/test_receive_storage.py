"""Atomic durable writes and the free-space watermark."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.receive import storage


def test_write_atomic_creates_folders_and_writes_all_chunks(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.dcm"
    size = storage.write_atomic(target, [b"abc", memoryview(b"defg")], durable=True)
    assert size == 7
    assert target.read_bytes() == b"abcdefg"
    assert [p.name for p in target.parent.iterdir()] == ["c.dcm"]  # no temp file left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    target.write_bytes(b"old")

    def chunks() -> Iterator[bytes]:
        yield b"new"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        storage.write_atomic(target, chunks(), durable=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


def test_watermark(tmp_path: Path) -> None:
    free = storage.free_mb(tmp_path / "not" / "yet")
    assert free > 0
    assert storage.has_room(tmp_path, 0)
    assert storage.has_room(tmp_path, 1)
    assert not storage.has_room(tmp_path, int(free) + 10_000_000)


def test_relative_path_is_study_series_instance() -> None:
    assert storage.relative_path("1.2", "1.3", "1.4") == Path("1.2/1.3/1.4.dcm")

"""Atomic durable writes and the free-space watermark."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.receive import storage, streamed


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


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[Path]:
    from dicomnode import durable

    synced: list[Path] = []
    real = durable.fsync_path

    def counting(path: Path) -> None:
        synced.append(path)
        time.sleep(delay)
        real(path)

    monkeypatch.setattr(durable, "fsync_path", counting)
    return synced


def test_folders_are_synced_into_their_parents_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _count_fsyncs(monkeypatch)
    study = tmp_path / "study"
    storage.write_atomic(study / "series" / "a.dcm", [b"a"], durable=True)
    # The file's entry, then the new series and study folders' (in their parents): after
    # the rename, so the first fsync commits all of it at once.
    assert synced == [study / "series", study, tmp_path]
    synced.clear()
    storage.write_atomic(study / "series" / "b.dcm", [b"b"], durable=True)
    assert synced == [study / "series"]
    synced.clear()
    # A folder this process did not make (another node, an earlier run): its entry once.
    (study / "other").mkdir()
    storage.write_atomic(study / "other" / "c.dcm", [b"c"], durable=True)
    storage.write_atomic(study / "other" / "d.dcm", [b"d"], durable=True)
    assert synced == [study / "other", study, study / "other"]


def test_a_remembered_folder_removed_meanwhile_is_made_again(tmp_path: Path) -> None:
    import shutil

    target = tmp_path / "study" / "series" / "a.dcm"
    storage.write_atomic(target, [b"a"], durable=True)
    shutil.rmtree(tmp_path / "study")  # retention purged the study
    assert storage.write_atomic(target, [b"again"], durable=True) == 5
    assert target.read_bytes() == b"again"


def test_concurrent_writers_into_one_folder_share_its_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode import durable

    folder = tmp_path / "series"
    folder.mkdir()
    synced = _count_fsyncs(monkeypatch, delay=0.2)
    started: list[float] = []
    real = durable.fsync_path

    def stamped(path: Path) -> None:
        started.append(time.monotonic())
        real(path)

    monkeypatch.setattr(durable, "fsync_path", stamped)
    barrier = threading.Barrier(8)
    asked: dict[int, float] = {}
    done: dict[int, float] = {}

    def writer(index: int) -> None:
        barrier.wait()
        asked[index] = time.monotonic()
        durable.sync_dir(folder)
        done[index] = time.monotonic()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= len(synced) < 8  # shared: at most one running and one to follow
    # Each writer returned only after an fsync that started after it asked had finished.
    for index in range(8):
        assert any(asked[index] <= start <= done[index] for start in started)


def test_a_stopped_receiver_discards_only_its_own_cut_off_transfers(tmp_path: Path) -> None:
    folder = streamed.enable(tmp_path)
    try:
        with streamed._incoming_file() as cut_off:  # a transfer the shutdown interrupted
            cut_off.write(b"partial")
        other_node = folder / ".in-999999999-abc.tmp"  # another node on the same storage
        other_node.write_bytes(b"receiving")
    finally:
        streamed.disable(folder)
    assert Path(cut_off.name).parent == folder
    assert streamed.discard_unfinished(folder) == 1
    assert not Path(cut_off.name).exists()
    assert other_node.exists()


def test_a_streamed_file_past_the_limit_is_emptied_and_only_counted(tmp_path: Path) -> None:
    folder = streamed.enable(tmp_path, max_data_set_bytes=1000)
    try:
        with streamed._incoming_file() as within:
            within.write(b"x" * 1000)
            within.file.flush()
        assert Path(within.name).stat().st_size == 1000
        assert streamed.cut_off(Path(within.name)) is None
        with streamed._incoming_file() as over:
            limit = 1000 + 64 * 1024  # the File Meta's room on top
            over.write(b"x" * limit)
            over.file.flush()
            assert Path(over.name).stat().st_size == limit
            over.write(b"y" * 10)  # one fragment past it: the file is emptied
            over.write(b"z" * 5000)  # the rest is counted, not written
            over.file.flush()
            assert Path(over.name).stat().st_size == 0
            assert streamed.cut_off(Path(over.name)) == limit + 5010
        assert streamed.cut_off(Path(over.name)) is None  # forgotten once pynetdicom closes it
    finally:
        streamed.disable(folder)
        for path in folder.iterdir():
            path.unlink()

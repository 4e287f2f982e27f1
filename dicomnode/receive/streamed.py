"""Data sets streamed to disk as they arrive, instead of gathered in memory.

With pynetdicom's `STORE_RECV_CHUNKED_DATASET` each received P-DATA fragment is appended to a
temporary Part-10 file (preamble, File Meta Information, the data set as sent), and the
C-STORE handler gets its path (`event.dataset_path`); pynetdicom deletes whatever is left at
that path once the handler returns. Memory then stays at about one PDU per association
whatever the data set's size (a 600 MB data set took the node to 2.6 GB in memory before).

pynetdicom writes those files with `tempfile.NamedTemporaryFile` and offers no setting for
their folder, so its module's reference is replaced by one that puts them in the storage
folder's `.incoming/`: on the storage filesystem, so the handler's final step is a rename,
and named like `write_atomic`'s temporaries (a dot first, `.tmp` last), so the start-up
sweep removes those a kill left behind. The handler maps the file and checks the data set in
place (`open_received`); only element headers are read, never the pixel data.

With `storage.max_instance_mb` set, writing stops once a file passes that size (plus room for
the File Meta): what came so far is truncated away and the rest of the transfer is counted,
not written, so an oversized data set never fills the disk before it is refused. The handler
asks `cut_off(path)` first and refuses the instance with the size that arrived.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pynetdicom import _config, dimse_messages

logger = logging.getLogger(__name__)

INCOMING = ".incoming"  # under the storage root
_PREAMBLE_END = 132  # 128-byte preamble + b"DICM"
_GROUP_LENGTH = struct.Struct("<HH2sHI")  # (0002,0000) UL, explicit VR little endian

_META_ROOM = 64 * 1024  # preamble and File Meta, over the data set limit
_lock = threading.Lock()
# Receivers running in this process, latest last: (folder, most bytes a file may hold; 0 = any)
_folders: list[tuple[Path, int]] = []
_cut: dict[str, int] = {}  # path of a file that passed its limit -> bytes received in all


class NotPart10(ValueError):
    """The received file is not the Part-10 file pynetdicom writes (a changed pynetdicom)."""


def enable(storage_root: Path, max_data_set_bytes: int = 0) -> Path:
    """Stream received data sets to files under `storage_root`, writing no file much past
    `max_data_set_bytes` (0: no limit); returns the folder used.

    Process-wide, as pynetdicom's configuration is: every receiver in this process streams.
    """
    folder = storage_root / INCOMING
    folder.mkdir(parents=True, exist_ok=True)
    limit = max_data_set_bytes + _META_ROOM if max_data_set_bytes > 0 else 0
    with _lock:
        _folders.append((folder, limit))
        dimse_messages.NamedTemporaryFile = _incoming_file  # type: ignore[attr-defined,assignment]
        _config.STORE_RECV_CHUNKED_DATASET = True
    return folder


def disable(folder: Path) -> None:
    """A receiver stopped: its folder takes no more files (streaming stays on)."""
    with _lock:
        for index, (used, _limit) in enumerate(_folders):
            if used == folder:
                del _folders[index]
                break


def discard_unfinished(folder: Path, pid: int | None = None) -> int:
    """Delete this process's (or process `pid`'s) streamed files still in `folder`; return
    how many.

    Called once the receiver has stopped and its stores have finished: a store renames its
    file away before it answers, so what is left is a transfer cut off by the shutdown, never
    acknowledged; and for a receiving worker process that died (receive/workers.py). Only
    that process's files (its pid is in their names): other nodes and processes may share
    the storage folder and be receiving into it now.
    """
    removed = 0
    for path in folder.glob(f"{_prefix(pid)}*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _prefix(pid: int | None = None) -> str:
    return f".in-{os.getpid() if pid is None else pid}-"


def _incoming_file(*, delete: bool = False, mode: str = "wb", suffix: str = "") -> _LimitedFile:
    """`NamedTemporaryFile` as pynetdicom 2.x/3.x calls it, in the latest receiver's folder."""
    del suffix  # ours instead: named like write_atomic's temporaries, for the sweep
    with _lock:
        folders = list(reversed(_folders))
    for folder, limit in folders:
        try:
            return _LimitedFile(tempfile.NamedTemporaryFile(
                mode, delete=delete, dir=folder, prefix=_prefix(), suffix=".tmp"), limit)
        except FileNotFoundError:  # that storage folder went away (a test's, a remount)
            continue
    # Never fail a receive over where the temporary file lives: the handler copies then.
    limit = folders[0][1] if folders else 0
    return _LimitedFile(tempfile.NamedTemporaryFile(
        mode, delete=delete, prefix=_prefix(), suffix=".tmp"), limit)


class _LimitedFile:
    """The temporary file as pynetdicom uses it (`write`, `file.flush()`, `name`, `close`),
    holding at most `limit` bytes (0: any): past it, the file is emptied and further
    fragments are only counted (`cut_off`)."""

    def __init__(self, handle: IO[bytes], limit: int) -> None:
        self._handle = handle
        self.file = getattr(handle, "file", handle)
        self.name = handle.name
        self._limit = limit
        self._received = 0

    def write(self, data: bytes) -> int:
        self._received += len(data)
        if self._limit and self._received > self._limit:
            with _lock:
                first = self.name not in _cut
                _cut[self.name] = self._received
            if first:
                self._handle.truncate(0)  # frees the disk now, not when the transfer ends
            return len(data)
        return self._handle.write(data)

    def close(self) -> None:
        with _lock:
            _cut.pop(self.name, None)
        self._handle.close()

    def __enter__(self) -> _LimitedFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def cut_off(path: Path) -> int | None:
    """Bytes received for a streamed file that passed its limit (and so holds nothing);
    None for one within it."""
    with _lock:
        return _cut.get(str(path))


@dataclass(frozen=True)
class Received:
    path: Path
    meta: memoryview  # preamble and File Meta Information as pynetdicom wrote them
    data: memoryview  # the data set as the sender encoded it


@contextlib.contextmanager
def open_received(path: Path) -> Iterator[Received]:
    """Map a streamed file read-only; the views are valid inside the `with` only."""
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        if size < _PREAMBLE_END + _GROUP_LENGTH.size:
            raise NotPart10(f"received file of {size} bytes has no File Meta Information")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    try:
        offset = _data_set_offset(view)
        meta, data = view[:offset], view[offset:]
        try:
            yield Received(path, meta, data)
        finally:
            _release(meta, data)
    finally:
        _release(view)
        # A view still held elsewhere (a traceback's frame, say) keeps the mapping: it goes
        # when that does. Raising here would hide the refusal being reported.
        with contextlib.suppress(BufferError):
            mapped.close()


def _release(*views: memoryview) -> None:
    for view in views:
        with contextlib.suppress(BufferError):
            view.release()


def _data_set_offset(view: memoryview) -> int:
    if bytes(view[128:_PREAMBLE_END]) != b"DICM":
        raise NotPart10("received file lacks the DICM prefix")
    group, element, vr, length, value = _GROUP_LENGTH.unpack_from(view, _PREAMBLE_END)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise NotPart10("received file does not start with File Meta Group Length")
    offset = _PREAMBLE_END + _GROUP_LENGTH.size + int(value)
    if offset > len(view):
        raise NotPart10("File Meta Group Length runs past the end of the received file")
    return offset

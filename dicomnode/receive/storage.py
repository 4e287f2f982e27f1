"""Received-file storage: where an instance lives, and the free-space watermark.

A C-STORE success is a promise, so files are written with `dicomnode.durable.write_atomic`
(temporary name, fsync, rename, folder fsync), re-exported here for the handler. A data set
streamed to disk as it arrived is moved into place instead (`place_received`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from dicomnode.durable import ensure_dir, is_cross_device, move_atomic, write_atomic
from dicomnode.receive.streamed import Received

__all__ = ["ensure_dir", "free_mb", "has_room", "place_received", "relative_path",
           "write_atomic"]

logger = logging.getLogger(__name__)

_BYTES_PER_MB = 1024 * 1024
_COPY_CHUNK = 1024 * 1024


def relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Where an instance lives under the storage root.

    UIDs are validated (digits and dots, at most 64 characters) before they get here,
    so they are safe as file names.
    """
    return Path(study_uid) / series_uid / f"{sop_instance_uid}.dcm"


def free_mb(path: Path) -> float:
    """Free space available to this process at `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / _BYTES_PER_MB


def has_room(path: Path, min_free_mb: int) -> bool:
    return min_free_mb <= 0 or free_mb(path) >= min_free_mb


def place_received(received: Received, target: Path, meta: bytes, *, durable: bool) -> int:
    """Store a streamed data set at `target` with `meta` (preamble and File Meta
    Information) in front; return the file's size.

    When pynetdicom wrote exactly `meta` and the file is on the storage filesystem, the file
    is renamed into place; otherwise its data set is copied behind `meta`, a chunk at a time.
    """
    if received.meta == meta:
        try:
            return move_atomic(received.path, target, durable=durable)
        except OSError as exc:
            if not is_cross_device(exc):
                raise
        logger.debug("streamed data set is on another filesystem; copying it")
    return write_atomic(target, _chunks(received.path, len(received.meta), meta),
                        durable=durable)


def _chunks(path: Path, offset: int, meta: bytes) -> Iterator[bytes]:
    yield meta
    with path.open("rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(_COPY_CHUNK):
            yield chunk

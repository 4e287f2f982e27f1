"""Durable file storage: atomic writes that survive a crash, and the free-space watermark.

A C-STORE success is a promise, so a file is written to a temporary name in its final
folder, flushed and fsync'd, renamed into place, and the folder fsync'd (the rename is
only durable once the directory entry is). Folders created on the way are fsync'd into
their parents for the same reason.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

_BYTES_PER_MB = 1024 * 1024


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, *, durable: bool) -> None:
    """Create `path` and missing parents; make each new directory entry durable."""
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # another thread made it first; its creator makes it durable
        if durable:
            _fsync_dir(folder.parent)


def write_atomic(target: Path, chunks: Iterable[bytes | memoryview], *, durable: bool) -> int:
    """Write `chunks` to `target` all-or-nothing; return the number of bytes written.

    Readers never see a partial file: they see the old file or the complete new one.
    """
    ensure_dir(target.parent, durable=durable)
    # Unique per thread and process so concurrent writers of the same name never collide.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    size = 0
    try:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                size += len(chunk)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(target.parent)
    return size

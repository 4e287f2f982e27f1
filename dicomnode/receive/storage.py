"""Received-file storage: where an instance lives, and the free-space watermark.

A C-STORE success is a promise, so files are written with `dicomnode.durable.write_atomic`
(temporary name, fsync, rename, folder fsync), re-exported here for the handler.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dicomnode.durable import ensure_dir, write_atomic

__all__ = ["ensure_dir", "free_mb", "has_room", "relative_path", "write_atomic"]

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

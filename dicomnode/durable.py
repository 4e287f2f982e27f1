"""Durable file operations shared by every stage that writes: crash-safe, all or nothing.

A file is written to a temporary name in its final folder, flushed and fsync'd, renamed into
place, and the folder fsync'd (the rename is only durable once the directory entry is).
Folders created on the way are fsync'd into their parents for the same reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (for a folder: its entries, e.g. a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
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
            fsync_path(folder.parent)


def write_atomic(target: Path, chunks: Iterable[bytes | memoryview], *, durable: bool) -> int:
    """Write `chunks` to `target` all-or-nothing; return the number of bytes written.

    Readers never see a partial file: they see the old file or the complete new one. The
    temporary name starts with a dot and ends in `.tmp`, so folder scanners skip it.
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
        fsync_path(target.parent)
    return size


def write_text_atomic(target: Path, text: str) -> None:
    """Durably replace a UTF-8 text file (a preset, a manifest) all-or-nothing."""
    write_atomic(target, [text.encode("utf-8")], durable=True)


# A writer keeps writing, so its temporary file's mtime keeps moving; one untouched this long
# belongs to a writer that died (kill -9, power cut) and is referenced by nothing.
STALE_TEMPORARY_SECONDS = 60.0


def sweep_temporaries(root: Path, *, older_than: float = STALE_TEMPORARY_SECONDS) -> int:
    """Delete `write_atomic`'s temporary files under `root` untouched for `older_than`
    seconds; return how many. Other nodes sharing the folder are writing theirs right now,
    so fresh ones are left alone."""
    cutoff = time.time() - older_than
    removed = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            path = Path(folder) / name
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # its writer finished (renamed it) meanwhile
    return removed

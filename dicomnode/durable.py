"""Durable file operations shared by every stage that writes: crash-safe, all or nothing.

A file is written to a temporary name in its final folder, flushed and fsync'd, renamed into
place, and the folder fsync'd (the rename is only durable once the directory entry is).
Folders created on the way are fsync'd into their parents for the same reason.

Each folder's fsync is shared by the writers waiting for it at the time (`sync_dir`): one
fsync that starts after a rename makes that rename durable, whoever asked for it. And a folder
this process has seen made durable is remembered, so writing into it again costs no fsync of
its parent and no walk up the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

_KNOWN_FOLDERS_MAX = 4096  # recent series folders; a forgotten one costs one more fsync


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (for a folder: its entries, e.g. a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FolderSync:
    """Group commit of folder fsyncs: concurrent callers for one folder share an fsync."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # folder -> [requests so far, requests covered by a finished fsync, fsync running]
        self._state: dict[Path, list[int]] = {}

    def sync(self, folder: Path) -> None:
        with self._cond:
            state = self._state.setdefault(folder, [0, 0, 0])
            state[0] += 1
            mine = state[0]
            try:
                while state[1] < mine:
                    if state[2]:
                        self._cond.wait()
                        continue
                    state[2] = 1
                    covers = state[0]  # every request made before this fsync starts
                    self._cond.release()
                    try:
                        fsync_path(folder)
                    finally:
                        self._cond.acquire()
                        state[2] = 0
                        self._cond.notify_all()
                    state[1] = max(state[1], covers)
            finally:
                if (state[1] >= state[0] and not state[2]
                        and self._state.get(folder) is state):
                    del self._state[folder]  # nobody waiting: drop the bookkeeping


_FOLDER_SYNC = _FolderSync()
_known_lock = threading.Lock()
_known: OrderedDict[Path, None] = OrderedDict()


def sync_dir(folder: Path) -> None:
    """Make the entries of `folder` durable (renames, new files, new sub-folders), sharing
    the fsync with concurrent callers where one that started after our change covers it."""
    _FOLDER_SYNC.sync(folder)


def _known_folder(path: Path) -> bool:
    with _known_lock:
        if path in _known:
            _known.move_to_end(path)
            return True
        return False


def _remember(path: Path) -> None:
    with _known_lock:
        _known[path] = None
        while len(_known) > _KNOWN_FOLDERS_MAX:
            _known.popitem(last=False)


def forget_folder(path: Path) -> None:
    """A remembered folder was removed (retention, an operator): look again next time."""
    with _known_lock:
        for known in [p for p in _known if p == path or path in p.parents]:
            del _known[known]


def ensure_dir(path: Path, *, durable: bool) -> None:
    """Create `path` and missing parents; make each new directory entry durable.

    A folder first seen already there has its entry synced once too: another thread or
    process may have created it a moment ago and not synced it yet.
    """
    _settle(path, _make_dirs(path), durable=durable)


def _make_dirs(path: Path) -> list[Path]:
    """Create `path` and missing parents; return the folders whose entries need syncing
    (the parents of those created, deepest first; none for a folder known durable)."""
    if _known_folder(path):
        return []
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        # Another writer may make it first; syncing its entry again costs little.
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
    return [folder.parent for folder in missing] if missing else [path.parent]


def _settle(path: Path, parents: list[Path], *, durable: bool) -> None:
    if durable:
        for parent in parents:
            sync_dir(parent)
    _remember(path)  # only now: a writer that finds it known skips these syncs


# The new folders' parents are synced after the file's own folder: on a journaling
# filesystem that first fsync commits the mkdirs and the rename together and the later ones
# find little left to do, where syncing each parent as its folder is made commits one
# journal transaction each. Every one still happens before the caller is answered.


def write_atomic(target: Path, chunks: Iterable[bytes | memoryview], *, durable: bool) -> int:
    """Write `chunks` to `target` all-or-nothing; return the number of bytes written.

    Readers never see a partial file: they see the old file or the complete new one. The
    temporary name starts with a dot and ends in `.tmp`, so folder scanners skip it.
    """
    parents = _make_dirs(target.parent)
    # Unique per thread and process so concurrent writers of the same name never collide.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    try:
        handle = open(tmp, "wb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        forget_folder(target.parent)  # removed since we last wrote there
        parents = _make_dirs(target.parent)
        handle = open(tmp, "wb")  # noqa: SIM115
    size = 0
    try:
        with handle:
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
        sync_dir(target.parent)
    _settle(target.parent, parents, durable=durable)
    return size


def move_atomic(source: Path, target: Path, *, durable: bool) -> int:
    """Move a complete file on the same filesystem into place as `write_atomic` would have
    written it (fsync'd, renamed, folder synced); return its size. Raises OSError with
    errno EXDEV when `source` is on another filesystem (then copy with `write_atomic`)."""
    if durable:
        fsync_path(source)
    parents = _make_dirs(target.parent)
    try:
        os.replace(source, target)
    except FileNotFoundError:
        if not source.exists():
            raise
        forget_folder(target.parent)  # the folder was removed since we last wrote there
        parents = _make_dirs(target.parent)
        os.replace(source, target)
    if durable:
        sync_dir(target.parent)
    _settle(target.parent, parents, durable=durable)
    return target.stat().st_size


def is_cross_device(exc: OSError) -> bool:
    return exc.errno == errno.EXDEV


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

"""One lock per key (a SOP Instance UID): in this process, created on demand and dropped when
unused (`KeyedLocks`), and across processes (`FileLocks`)."""

from __future__ import annotations

import fcntl
import os
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class FileLocks:
    """Locks shared by every process on this machine that uses `folder`: the receiving
    worker processes of `receive.processes`, and the main process (STOW-RS).

    A key maps to one of `buckets` lock files, locked with `flock` on a descriptor of its
    own (so threads of one process exclude each other too). Keys that share a bucket take
    turns; a lock is held for one instance's write and commit, so that costs little.
    """

    def __init__(self, folder: Path, buckets: int = 64) -> None:
        self.folder = folder
        self.buckets = buckets

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        path = self.folder / f"{zlib.crc32(key.encode()) % self.buckets:02d}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

"""A node process's stable identity, so that after a restart it takes back its own work at
once instead of waiting for its previous leases to lapse.

The identity lives under the storage path (`.nodes/<host>-<role>-<slot>.id`, a UUID made
once) and is held with an exclusive `flock` for the life of the process. A process that can
lock a slot knows that whoever held it before is gone, so the jobs and deliveries claimed
under that identity are orphans it may take back immediately. Several processes on one
host (sharing a storage path or not) take different slots; the host name keeps hosts that
share storage apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from dicomnode.durable import ensure_dir

logger = logging.getLogger(__name__)

_SLOTS = 64


@dataclass
class NodeIdentity:
    name: str
    resumable: bool  # False: no slot could be locked, so nothing is taken back
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # also drops the lock
            self._fd = None


def claim_identity(storage: Path, role: str) -> NodeIdentity:
    host = socket.gethostname()
    folder = storage / ".nodes"
    try:
        ensure_dir(folder, durable=True)
        for slot in range(_SLOTS):
            path = folder / f"{host}-{role}-{slot}.id"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            token = os.read(fd, 64).decode("ascii", "replace").strip()
            if not token:
                token = uuid.uuid4().hex
                os.write(fd, token.encode("ascii"))
                os.fsync(fd)
            return NodeIdentity(f"{host}-{role}{slot}-{token[:12]}", True, fd)
    except OSError as exc:
        logger.warning("no stable node identity under %s (%s): work left by a previous run "
                       "is taken back only when its leases lapse", folder, exc)
    return NodeIdentity(f"{host}-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}", False)

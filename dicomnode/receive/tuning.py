"""Process-wide pynetdicom settings for receiving, chosen from a profile of a storescu burst
(scripts/profile_ingest.py; figures in the README, section Benchmark).

- `AssociationSocket.recv` reads a PDU 4096 bytes per `socket.recv` call, each result then
  copied onto a growing bytearray: a 128 KB PDU took 32 system calls and as many copies.
  Here it is read with `recv_into` straight into its buffer, as much as the socket holds per
  call. The buffer is allocated for at most `_PREALLOCATE` bytes up front and grows as
  data arrives beyond that, so a peer announcing a huge PDU length does not make the node
  allocate it before sending it (as the original does not either).
- pynetdicom's "standard" log handlers run on every PDU and DIMSE message received and
  sent, to log at DEBUG level; the node holds pynetdicom's loggers at WARNING, so they only
  cost time. `LOG_HANDLER_LEVEL = "none"` leaves them unbound.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import _config
from pynetdicom.transport import AssociationSocket

logger = logging.getLogger(__name__)

_PREALLOCATE = 4 * 1024 * 1024
_original_recv = AssociationSocket.recv


def apply() -> None:
    """Idempotent; called by every receiver at start."""
    _config.LOG_HANDLER_LEVEL = "none"
    AssociationSocket.recv = _recv  # type: ignore[method-assign]


def _recv(self: Any, nr_bytes: int) -> bytearray:
    """`AssociationSocket.recv`: block until `nr_bytes` are read or the peer closes (then
    return what was read); socket timeouts and errors propagate as before."""
    sock = self.socket
    if sock is None:  # as the original, which fails on a closed socket the same way
        return _original_recv(self, nr_bytes)
    buffer = bytearray(min(nr_bytes, _PREALLOCATE))
    nr_read = 0
    while nr_read < nr_bytes:
        if nr_read == len(buffer):  # beyond the preallocation: grow as data comes
            buffer.extend(bytes(min(nr_bytes - nr_read, _PREALLOCATE)))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[nr_read:])
        if not count:  # connection broken: what was read so far, as the original
            break
        nr_read += count
    if nr_read < len(buffer):
        del buffer[nr_read:]
    return buffer

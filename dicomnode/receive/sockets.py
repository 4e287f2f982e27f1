"""Listening sockets made once and shared by several receiving processes (`receive.processes`).

The main process binds and listens; each worker process inherits the socket and runs its
association server on it, as `storescp --fork`'s children share their parent's: whichever
process is free accepts the next connection, and a worker that dies or restarts loses no
connection waiting in the backlog (with SO_REUSEPORT each process would have its own backlog,
and the kernel would spread senders by a hash of their addresses, not by who is free).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

_BACKLOG = 128


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 = one the system picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class Prebound:
    """Mixin for pynetdicom's association servers: serve an inherited listening socket.

    Non-blocking, because every process wakes for a new connection and only one gets it:
    the others' `accept` must fail at once (socketserver then just polls again) instead of
    blocking the accept loop for the network timeout. Closing it closes this process's
    descriptor only: `shutdown()` on the socket would stop it listening for every process.
    """

    socket: Any
    server_address: Any

    def __init__(self, *args: Any, listening: socket.socket, **kwargs: Any) -> None:
        self._listening = listening
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.close()  # the one TCPServer made
        self._listening.setblocking(False)
        self.socket = self._listening
        self.server_address = self._listening.getsockname()

    def server_activate(self) -> None:
        """Already listening."""

    def server_close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()


class PreboundAssociationServer(Prebound, ThreadedAssociationServer):
    """The plain listener of a receiving worker process."""

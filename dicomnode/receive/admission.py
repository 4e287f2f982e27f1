"""Who gets an association slot: connections are admitted before anyone knows who they are.

pynetdicom counts a TCP connection as an association from the moment it is accepted, and a
reader blocked on a connection that sent two bytes only times out after the network timeout,
so a few silent connections used to lock every camera out. Here:

- a connection must deliver a complete A-ASSOCIATE-RQ within
  `node.association_request_timeout_seconds`, or its socket is closed;
- one address holds at most `node.max_associations_per_host` connections;
- when a limit is reached, a new connection displaces the oldest connection that has not yet
  sent its request (real callers send it within milliseconds; silent ones lose their place)
  and is closed itself only when there is none;
- `node.max_associations` is for everyone; `node.reserved_associations` more are kept for
  callers on the allow-list (checked once the request names the calling AE title), and
  connections that have not sent their request yet never hold more than
  `node.max_associations` slots between them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_REAP_INTERVAL = 0.2
# Connections let in beyond the limits when nothing can be displaced: each gets a proper
# A-ASSOCIATE-RJ (local limit exceeded) at its request rather than a bare close. pynetdicom's
# own pool is sized to the limits plus this.
OVERFLOW = 8


@dataclass
class _Connection:
    host: str
    opened: float
    requested: bool = False  # a complete A-ASSOCIATE-RQ arrived
    admitted: bool = False  # the request was accepted (counts against the limits)


class Admission:
    def __init__(self, *, max_associations: int, per_host: int, reserved: int,
                 request_timeout: float) -> None:
        self.max_associations = max_associations
        self.per_host = per_host
        self.reserved = reserved
        self.request_timeout = request_timeout
        self._connections: dict[Any, _Connection] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    @property
    def connection_limit(self) -> int:
        """Connections held at once (pynetdicom's own limit is set above this)."""
        return self.max_associations + self.reserved

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap, name="admission-reaper",
                                        daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=2)

    # -- events --------------------------------------------------------------------------------

    def opened(self, assoc: Any, host: str) -> bool:
        """A TCP connection was accepted. False: it was closed (no room even by displacing)."""
        victims: list[Any] = []
        with self._lock:
            now = time.monotonic()
            from_host = [a for a, c in self._connections.items() if c.host == host]
            if len(from_host) >= self.per_host:
                victim = self._oldest_waiting(from_host)
                if victim is None:
                    logger.warning("connection from %s closed: %d connections from that "
                                   "address already", host, len(from_host))
                    _close(assoc)
                    return False
                victims.append(victim)
            # Connections that have not said who they are never fill the reserved slots.
            waiting = [a for a, c in self._connections.items()
                       if not c.requested and a not in victims]
            if len(waiting) >= self.max_associations:
                victim = self._oldest_waiting(waiting)
                if victim is not None:
                    victims.append(victim)
            held = len(self._connections) - len(victims)
            if held >= self.connection_limit:
                victim = self._oldest_waiting(
                    [a for a in self._connections if a not in victims])
                if victim is not None:
                    victims.append(victim)
                elif held >= self.connection_limit + OVERFLOW:
                    logger.warning("connection from %s closed: %d connections open", host,
                                   held)
                    _close(assoc)
                    return False
            for victim in victims:
                self._connections.pop(victim, None)
            self._connections[assoc] = _Connection(host, now)
        for victim in victims:
            logger.warning("closing a connection that sent no association request, to make "
                           "room for a new one from %s", host)
            _close(victim)
        return True

    def requested(self, assoc: Any, *, allow_listed: bool) -> bool:
        """The request arrived (and passed the caller check): may it take a slot?"""
        with self._lock:
            connection = self._connections.get(assoc)
            if connection is None:  # opened before the handler was bound (tests)
                connection = self._connections[assoc] = _Connection("", time.monotonic())
            connection.requested = True
            admitted = sum(1 for c in self._connections.values() if c.admitted)
            limit = self.max_associations + (self.reserved if allow_listed else 0)
            if admitted >= limit:
                return False
            connection.admitted = True
            return True

    def closed(self, assoc: Any) -> None:
        with self._lock:
            self._connections.pop(assoc, None)

    # -- internals -----------------------------------------------------------------------------

    def _oldest_waiting(self, candidates: list[Any]) -> Any | None:
        waiting = [a for a in candidates if not self._connections[a].requested]
        return min(waiting, key=lambda a: self._connections[a].opened, default=None)

    def _reap(self) -> None:
        while not self._stop.wait(_REAP_INTERVAL):
            deadline = time.monotonic() - self.request_timeout
            with self._lock:
                late = [a for a, c in self._connections.items()
                        if not c.requested and c.opened < deadline]
                for assoc in late:
                    self._connections.pop(assoc, None)
            for assoc in late:
                logger.warning("closing a connection that sent no complete association "
                               "request within %.0f s", self.request_timeout)
                _close(assoc)


def _close(assoc: Any) -> None:
    """Shut the connection's socket (a reader blocked in recv() returns at once), and end
    the association thread waiting for the request.

    That thread waits on its DUL's queue for the A-ASSOCIATE-RQ, up to the ACSE timeout; a
    connection that ends before a request puts nothing there (pynetdicom's state machine
    goes back to idle silently), so the thread would wait out the timeout, and it counts
    against pynetdicom's own association limit meanwhile: enough closed silent connections
    and every camera got "local limit exceeded". A None in the queue is what a timeout
    returns; the thread then ends at once.
    """
    dul = getattr(assoc, "dul", None)
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    if sock is not None:
        # Shut down, not close: pynetdicom's reactor closes it once it sees the end, and a
        # closed descriptor under its select() would raise in that thread instead.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    queue = getattr(dul, "to_user_queue", None)
    if queue is not None and not getattr(assoc, "is_established", False):
        queue.put(None)

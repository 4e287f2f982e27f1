"""Wake the stage that has work as soon as the row that makes it is committed.

A transaction that creates work for another stage marks a topic (`mark(session, JOBS)`);
once it commits, every threading.Event subscribed to that topic in this process is set. On
PostgreSQL the mark is also a `pg_notify` in the same transaction (delivered only if it
commits), and a listener thread (`Wakeups.listen`) turns other processes' notifications into
the same wake-ups, so a job queued by one node wakes another node's idle worker at once.

The rows stay the record: every stage still polls its table (slowly) and does a full pass on
each wake, so a lost notification (SQLite across processes, a listener reconnecting) costs
one poll interval, never work.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

JOBS = "jobs"  # a study to plan or a job to claim
RESULTS = "results"  # a finished job to encode
OUTBOX = "outbox"  # a delivery due now

CHANNEL = "dicomnode_wake"
_TOPICS = frozenset({JOBS, RESULTS, OUTBOX})
_INFO_KEY = "dicomnode.wake"
_RECONNECT_SECONDS = 5.0


def mark(session: Session, topic: str) -> None:
    """Wake `topic`'s subscribers when `session`'s transaction commits (never on rollback)."""
    if topic not in _TOPICS:
        raise ValueError(f"unknown wake-up topic {topic!r}")
    marked: set[str] = session.info.setdefault(_INFO_KEY, set())
    if topic in marked:
        return
    marked.add(topic)
    if session.get_bind().dialect.name == "postgresql":
        # Transactional: PostgreSQL delivers it at commit, to every listening session.
        session.execute(text("SELECT pg_notify(:channel, :topic)"),
                        {"channel": CHANNEL, "topic": topic})


class Wakeups:
    """The subscribers of one Database's sessions, and its PostgreSQL listener."""

    def __init__(self, engine: Engine, sessions: sessionmaker[Session]) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[threading.Event]] = defaultdict(set)
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_rollback", self._after_rollback)

    def subscribe(self, topic: str, wake: threading.Event) -> None:
        with self._lock:
            self._subscribers[topic].add(wake)

    def unsubscribe(self, topic: str, wake: threading.Event) -> None:
        with self._lock:
            self._subscribers[topic].discard(wake)

    def notify(self, topic: str) -> None:
        """Set every Event subscribed to `topic` (in this process)."""
        with self._lock:
            subscribers = list(self._subscribers.get(topic, ()))
        for wake in subscribers:
            wake.set()

    def _after_commit(self, session: Session) -> None:
        for topic in session.info.pop(_INFO_KEY, ()):
            self.notify(topic)

    @staticmethod
    def _after_rollback(session: Session) -> None:
        session.info.pop(_INFO_KEY, None)

    # -- other processes (PostgreSQL) ------------------------------------------------------

    def listen(self) -> None:
        """Start turning other processes' notifications into wake-ups (PostgreSQL only)."""
        if self._engine.dialect.name != "postgresql" or self._listener is not None:
            return
        self._stop.clear()
        self._listener = threading.Thread(target=self._listen, name="db-wakeups",
                                          daemon=True)
        self._listener.start()

    def close(self) -> None:
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.join(5.0)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen_once()
            except Exception as exc:  # the slow polls still run; try again shortly
                logger.warning("database notifications unavailable (stages fall back to "
                               "polling); reconnecting in %.0f s: %s", _RECONNECT_SECONDS, exc)
                # Whatever was announced meanwhile is found by a full pass now.
                for topic in _TOPICS:
                    self.notify(topic)
                self._stop.wait(_RECONNECT_SECONDS)

    def _listen_once(self) -> None:
        # A connection of its own, outside the pool: it stays in LISTEN for the node's life.
        raw = self._engine.raw_connection()
        connection: Any = raw.driver_connection  # before detach(), which clears it
        raw.detach()
        try:
            connection.autocommit = True
            connection.execute(f"LISTEN {CHANNEL}")
            # A pass after (re)connecting: rows committed before LISTEN took effect.
            for topic in _TOPICS:
                self.notify(topic)
            while not self._stop.is_set():
                # Returns after a second without notifications, so stopping is prompt.
                for note in connection.notifies(timeout=1.0):
                    if note.payload in _TOPICS:
                        self.notify(note.payload)
        finally:
            raw.close()

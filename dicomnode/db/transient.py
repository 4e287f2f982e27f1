"""Transient database errors: retried with backoff, bounded; permanent ones are not.

Transient: the connection was lost or invalidated (a restarted server, a killed backend, a
failover), a serialization failure or deadlock, a lock that could not be had in time, the
server starting up or shutting down, SQLite's "database is locked/busy". Permanent: anything
else (a constraint, a missing table, a bad statement) - retrying would only repeat it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from dicomnode.redact import safe_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATE classes and codes (PostgreSQL appendix A) that a retry can cure.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40")  # connection exception, transaction rollback
_TRANSIENT_SQLSTATES = frozenset({
    "55P03",  # lock_not_available
    "57P01", "57P02", "57P03",  # admin_shutdown, crash_shutdown, cannot_connect_now
    "57014",  # query_canceled (statement or lock timeout)
    "53300",  # too_many_connections
})
_MAX_DELAY_SECONDS = 10.0


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        return _transient_driver_error(exc.orig)
    return _transient_driver_error(exc)


def _transient_driver_error(orig: BaseException | None) -> bool:
    if orig is None:
        return False
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES
    try:
        import psycopg
    except ImportError:  # pragma: no cover - SQLite-only installs
        return False
    # No SQLSTATE: the connection itself failed (refused, reset, closed).
    return isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError)


@dataclass
class Retries:
    """What a `retrying` call went through: the errors it retried (already scrubbed)."""

    errors: list[str] = field(default_factory=list)


def retrying(
    operation: Callable[[], T],
    *,
    what: str,
    attempts: int,
    first_delay: float,
    retries: Retries | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `operation`; on a transient database error wait and run it again, at most
    `attempts` more times (delays first_delay, doubling, capped). Anything else, or the
    last transient error, propagates."""
    delay = first_delay
    for attempt in range(attempts + 1):
        try:
            return operation()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            message = safe_error(exc)
            if retries is not None:
                retries.errors.append(message)
            logger.warning("%s: transient database error (retry %d of %d in %.1f s): %s",
                           what, attempt + 1, attempts, delay, message)
            sleep(delay)
            delay = min(delay * 2, _MAX_DELAY_SECONDS)
    raise AssertionError("unreachable")  # pragma: no cover

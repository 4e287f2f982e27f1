"""Login throttling: too many failed logins for one user name, or from one address, in a window.

Failures are rows in `login_failures` (migration 9), so every node sharing the database counts
the same failures and a restart forgets none. While a name or address is over its limit, logins
are refused before the password is checked; a refusal is audited but not counted, so the lock
ends when the window has passed over the failures that caused it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, func, select, text
from sqlalchemy.orm import Session

from dicomnode.db.models import LoginFailure, as_utc
from dicomnode.errors import UserError
from dicomnode.settings import WebSettings

logger = logging.getLogger(__name__)

# Column widths of login_failures (and audit_events.actor / .peer).
NAME_WIDTH = 64
ADDRESS_WIDTH = 64
_ADVISORY_KEY = 0x6C6F67696E  # "login"


@dataclass(frozen=True)
class LoginLimits:
    per_user: int
    per_address: int
    window: timedelta

    @classmethod
    def from_settings(cls, web: WebSettings) -> LoginLimits:
        return cls(web.login_max_failures_per_user, web.login_max_failures_per_address,
                   timedelta(minutes=web.login_window_minutes))


class LoginThrottled(UserError):
    """Logins for this name or from this address are refused until `retry_after` seconds pass."""

    def __init__(self, retry_after: int) -> None:
        minutes = max(1, math.ceil(retry_after / 60))
        super().__init__(
            f"Too many failed sign-ins; try again in {minutes} minute{'s' if minutes != 1 else ''}"
        )
        self.retry_after = retry_after


def _lock_ends(session: Session, match: ColumnElement[bool], limit: int,
               window: timedelta, now: datetime) -> datetime | None:
    """When the failures `match` selects fall below `limit` again; None if they are now."""
    where = (match, LoginFailure.at >= now - window)
    count = session.scalar(select(func.count()).select_from(LoginFailure).where(*where)) or 0
    if count < limit:
        return None
    # Below the limit again once the limit-th newest failure has left the window.
    pivot = session.scalar(
        select(LoginFailure.at).where(*where)
        .order_by(LoginFailure.at.desc()).offset(limit - 1).limit(1))
    return (as_utc(pivot) if pivot is not None else now) + window


def retry_after(session: Session, name: str, address: str | None, limits: LoginLimits,
                now: datetime) -> int | None:
    """Seconds until a login for `name` from `address` may be tried; None if it may be now.

    Old failures are deleted on the way: the table stays small without a timer.
    """
    session.execute(delete(LoginFailure).where(LoginFailure.at < now - limits.window))
    ends = [_lock_ends(session, LoginFailure.user_name == name[:NAME_WIDTH], limits.per_user,
                       limits.window, now)]
    if address:
        ends.append(_lock_ends(session, LoginFailure.address == address[:ADDRESS_WIDTH],
                               limits.per_address, limits.window, now))
    latest = max((end for end in ends if end is not None), default=None)
    if latest is None:
        return None
    return max(1, math.ceil((latest - now).total_seconds()))


def add_failure(session: Session, name: str, address: str | None, now: datetime) -> int:
    """Count a failure (or an attempt in progress, see `admit`); returns its row id."""
    row = LoginFailure(at=now, user_name=name[:NAME_WIDTH],
                       address=address[:ADDRESS_WIDTH] if address else None)
    session.add(row)
    session.flush()
    return int(row.id)


def serialise(session: Session) -> None:
    """Make this transaction the only one checking and counting login attempts until it ends.

    SQLite's BEGIN IMMEDIATE already does; PostgreSQL counts under READ COMMITTED, so two
    checks at once would both see the count below the limit: a transaction-scoped advisory
    lock orders them (logins are rare; one lock for all is enough).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_KEY})


def forget(session: Session, failure_id: int) -> None:
    """Drop an attempt counted in advance, once its password proved right."""
    session.execute(delete(LoginFailure).where(LoginFailure.id == failure_id))


def clear_name(session: Session, name: str) -> None:
    """A successful login forgives the name's failures (not the address's)."""
    session.execute(delete(LoginFailure).where(LoginFailure.user_name == name[:NAME_WIDTH]))

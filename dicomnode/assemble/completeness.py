"""Study completion in the database: the rules, and the one conditional UPDATE that decides.

Every way to complete a study is the same statement, `UPDATE studies SET state='complete'
... WHERE id = :id AND state = 'receiving' [AND <quiet period over>]`. It is atomic, so
of two threads or two nodes on PostgreSQL racing to complete a study exactly one sees a row
updated (the other waits on the row lock, re-checks the WHERE clause, and updates nothing);
SQLite gets the same from BEGIN IMMEDIATE. Only the winner writes the audit row and runs the
on-complete hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from dicomnode.db import audit, wakeups
from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Study, StudyState, as_utc, utcnow
from dicomnode.errors import StudyNotFoundError

logger = logging.getLogger(__name__)

EXPECTED_CONTENT = "expected-content"
QUIET_PERIOD = "quiet-period"
FORCED = "forced"


def lateralities_cover(found: Collection[str | None], expected: Collection[str]) -> bool:
    """True when the lateralities found include every expected one (B counts as both)."""
    if not expected:
        return False
    have = {value.upper() for value in found if value}
    if "B" in have:
        have |= {"L", "R"}
    return set(expected) <= have


def _complete(
    session: Session,
    study_id: int,
    reason: str,
    now: datetime,
    *,
    announce: bool,
    extra: ColumnElement[bool] | None = None,
) -> bool:
    """The deciding conditional UPDATE; True if this caller completed the study."""
    condition = (Study.id == study_id) & (Study.state == StudyState.RECEIVING)
    if extra is not None:
        condition = condition & extra
    values: dict[str, Any] = {
        "state": StudyState.COMPLETE,
        "completed_at": now,
        "completed_reason": reason,
        "updated_at": now,
        "quiet_until": None,
    }
    if announce:
        values["announced_at"] = now
    # No ORM session synchronisation: rows are re-read when needed, and SQLite's naive
    # timestamps cannot be compared in Python with aware ones.
    result = session.execute(
        update(Study).where(condition).values(**values),
        execution_options={"synchronize_session": False},
    )
    return int(getattr(result, "rowcount", 0) or 0) == 1


def _study(session: Session, study_uid: str) -> Study | None:
    return session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()


def complete_if_expected(
    database: Database, study_uid: str, expected: Collection[str], *, announce: bool = True
) -> bool:
    """Complete a receiving study whose instances cover the expected lateralities."""
    if not expected:
        return False
    with database.transaction() as session:
        study = _study(session, study_uid)
        if study is None or study.state != StudyState.RECEIVING:
            return False
        found = session.scalars(
            select(Instance.laterality).where(Instance.study_id == study.id).distinct()
        ).all()
        if not lateralities_cover(found, expected):
            return False
        now = utcnow()
        if not _complete(session, study.id, EXPECTED_CONTENT, now, announce=announce):
            return False
        audit.record(session, "study-complete", study_uid=study_uid, detail=EXPECTED_CONTENT)
        return True


@dataclass(frozen=True)
class QuietCheck:
    completed: bool
    # Still receiving with a quiet period not yet over: when to look again.
    recheck_at: datetime | None


def complete_if_quiet(database: Database, study_uid: str, *, announce: bool = True,
                      quiet_seconds: float | None = None) -> QuietCheck:
    """Complete a receiving study whose quiet period has passed: `quiet_until` as the receiver
    set it (the node's quiet period), or `quiet_seconds` after the last instance (the
    study's own rule, e.g. its preset's). A study not yet due by its own rule gets that due
    time as its `quiet_until`, so the sweep (`due_studies`) leaves it until then rather than
    asking its rules again at every pass."""
    with database.transaction() as session:
        study = _study(session, study_uid)
        if study is None or study.state != StudyState.RECEIVING:
            return QuietCheck(False, None)
        now = utcnow()
        wait = None if quiet_seconds is None else timedelta(seconds=quiet_seconds)
        over = (Study.quiet_until <= now if wait is None
                else Study.last_instance_at <= now - wait)
        if _complete(session, study.id, QUIET_PERIOD, now, announce=announce, extra=over):
            audit.record(session, "study-complete", study_uid=study_uid, detail=QUIET_PERIOD)
            return QuietCheck(True, None)
        session.refresh(study)
        if study.state != StudyState.RECEIVING:
            return QuietCheck(False, None)
        if wait is not None:
            due = as_utc(study.last_instance_at) + wait
            # Only if no instance came meanwhile: the receiver's newer `quiet_until` stands.
            session.execute(
                update(Study).where(Study.id == study.id,
                                    Study.state == StudyState.RECEIVING,
                                    Study.last_instance_at == study.last_instance_at)
                .values(quiet_until=due),
                execution_options={"synchronize_session": False})
            return QuietCheck(False, due)
        if study.quiet_until is not None:
            return QuietCheck(False, as_utc(study.quiet_until))
        return QuietCheck(False, None)


def force_complete(database: Database, study_uid: str, *, actor: str | None = None,
                   announce: bool = False) -> bool:
    """An operator completes a study. False if it was no longer receiving.

    From the command line `announce` is False: a running node's sweep finds the completed,
    unannounced study and runs the hooks; with no node running, the next start does.
    """
    with database.transaction() as session:
        study = _study(session, study_uid)
        if study is None:
            raise StudyNotFoundError(f"no study with Study Instance UID {study_uid}")
        if not _complete(session, study.id, FORCED, utcnow(), announce=announce):
            return False
        # Unannounced, a running node's job workers plan it (a notification reaches them on
        # PostgreSQL at once; otherwise at their next poll).
        wakeups.mark(session, wakeups.JOBS)
        audit.record(session, "study-complete", actor=actor, study_uid=study_uid, detail=FORCED)
        return True


def receiving_studies(database: Database) -> list[tuple[str, datetime | None]]:
    """(study_uid, quiet_until) of every study still receiving: the timers to rebuild."""
    with database.transaction() as session:
        rows = session.execute(
            select(Study.study_uid, Study.quiet_until).where(Study.state == StudyState.RECEIVING)
        ).all()
    return [(uid, None if when is None else as_utc(when)) for uid, when in rows]


def due_studies(database: Database) -> list[str]:
    """Receiving studies whose quiet period is over (missed timers, other nodes' studies)."""
    with database.transaction() as session:
        now = utcnow()
        return list(session.scalars(
            select(Study.study_uid).where(
                Study.state == StudyState.RECEIVING, Study.quiet_until <= now
            )
        ).all())


def unannounced_studies(database: Database) -> list[str]:
    """Studies completed (by an operator, another process, or before a crash) whose
    on-complete hooks have not run."""
    with database.transaction() as session:
        return list(session.scalars(
            select(Study.study_uid).where(
                Study.state == StudyState.COMPLETE, Study.announced_at.is_(None)
            )
        ).all())


def claim_announcement(database: Database, study_uid: str) -> bool:
    """Claim the right to run the hooks for a completed study (one claimant wins)."""
    with database.transaction() as session:
        result = session.execute(
            update(Study)
            .where(Study.study_uid == study_uid, Study.announced_at.is_(None),
                   Study.state == StudyState.COMPLETE)
            .values(announced_at=utcnow()),
            execution_options={"synchronize_session": False},
        )
        return int(getattr(result, "rowcount", 0) or 0) == 1

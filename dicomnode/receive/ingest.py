"""Record a stored instance in the database: upsert study and series, insert the instance.

One transaction per instance, in a fixed lock order (study, series, instance) so concurrent
associations never deadlock. The study row is locked (SELECT ... FOR UPDATE on PostgreSQL;
BEGIN IMMEDIATE serialises SQLite) before its state is read, so an instance and a completion
can never both believe they came first: an instance either lands in a receiving study and
pushes its quiet period on, or lands after completion and is recorded as late.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import Table, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dicomnode.db import audit
from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Series, Study, StudyState, utcnow
from dicomnode.receive.identifiers import Identifiers

logger = logging.getLogger(__name__)


class Outcome(Enum):
    STORED = "stored"
    LATE = "late"  # the study had already completed; flagged for re-processing
    DUPLICATE = "duplicate"  # SOP Instance already held; nothing changed


@dataclass(frozen=True)
class Arrival:
    """What the receiver knows about one instance it has written to storage."""

    ids: Identifiers
    transfer_syntax_uid: str
    path: str  # relative to the storage root
    size_bytes: int
    calling_ae: str | None
    called_ae: str | None
    peer: str | None


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    study_uid: str
    quiet_until: datetime | None  # set while the study is receiving


def _clip(value: str | None, length: int) -> str | None:
    return value[:length] if value is not None else None


def _insert_ignore(session: Session, table: Table, key: str, values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT (key) DO NOTHING; True if a row was inserted.

    RETURNING says so on both dialects (rowcount is unreliable with RETURNING on psycopg).
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    result = session.execute(
        insert(table).values(**values).on_conflict_do_nothing(index_elements=[key])
        .returning(table.c.id)
    )
    return result.first() is not None


class HeldElsewhere(Exception):
    """The SOP Instance UID is already held at another path (another study or series)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"SOP Instance already held at {path}")
        self.path = path


def held_path(database: Database, sop_instance_uid: str) -> str | None:
    """The stored path (relative) of an instance already held, or None.

    A plain read: the decision it feeds is taken again, under the write lock, by
    `record_arrival` (its insert conflicts when another store committed meanwhile)."""
    with database.reading() as session:
        path: str | None = session.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid))
        return path


def is_stored(database: Database, sop_instance_uid: str) -> bool:
    with database.transaction() as session:
        return bool(
            session.scalar(select(exists().where(Instance.sop_instance_uid == sop_instance_uid)))
        )


def record_arrival(database: Database, arrival: Arrival, *, quiet_seconds: float) -> IngestResult:
    """Commit the rows for a stored instance (and its audit row); say what happened."""
    ids = arrival.ids
    with database.transaction() as session:
        now = utcnow()
        quiet_until = now + timedelta(seconds=quiet_seconds)
        _insert_ignore(session, Study.__table__, "study_uid", {  # type: ignore[arg-type]
            "study_uid": ids.study_uid,
            "patient_id": _clip(ids.patient_id, 64),
            "study_date": _clip(ids.study_date, 8),
            "station_name": _clip(ids.station_name, 64),
            "calling_ae": _clip(arrival.calling_ae, 16),
            "called_ae": _clip(arrival.called_ae, 16),
            "state": StudyState.RECEIVING,
            "created_at": now,
            "updated_at": now,
            "last_instance_at": now,
            "quiet_until": quiet_until,
            "needs_reprocess": False,
        })
        study = session.execute(
            select(Study).where(Study.study_uid == ids.study_uid).with_for_update()
        ).scalar_one()
        _insert_ignore(session, Series.__table__, "series_uid", {  # type: ignore[arg-type]
            "study_id": study.id,
            "series_uid": ids.series_uid,
            "modality": _clip(ids.modality, 16),
            "created_at": now,
        })
        series_id = session.scalar(select(Series.id).where(Series.series_uid == ids.series_uid))
        late = study.state != StudyState.RECEIVING
        inserted = _insert_ignore(session, Instance.__table__, "sop_instance_uid", {  # type: ignore[arg-type]
            "study_id": study.id,
            "series_id": series_id,
            "sop_instance_uid": ids.sop_instance_uid,
            "sop_class_uid": ids.sop_class_uid,
            "transfer_syntax_uid": arrival.transfer_syntax_uid,
            "modality": _clip(ids.modality, 16),
            "laterality": _clip(ids.laterality, 2),
            "path": arrival.path,
            "size_bytes": arrival.size_bytes,
            "calling_ae": _clip(arrival.calling_ae, 16),
            "received_at": now,
            "late": late,
        })
        if not inserted:
            existing = session.scalar(
                select(Instance.path).where(Instance.sop_instance_uid == ids.sop_instance_uid))
            if existing is not None and existing != arrival.path:
                raise HeldElsewhere(existing)  # rolls back the study and series rows too
            _audit(session, "duplicate", arrival, "SOP Instance already held")
            return IngestResult(Outcome.DUPLICATE, ids.study_uid, None)
        if late:
            session.execute(
                update(Study)
                .where(Study.id == study.id)
                .values(updated_at=now, last_instance_at=now, needs_reprocess=True),
                execution_options={"synchronize_session": False},
            )
            _audit(session, "late", arrival, f"arrived after completion (study {study.state})")
            return IngestResult(Outcome.LATE, ids.study_uid, None)
        session.execute(
            update(Study)
            .where(Study.id == study.id)
            .values(updated_at=now, last_instance_at=now, quiet_until=quiet_until),
            execution_options={"synchronize_session": False},
        )
        _audit(session, "arrived", arrival, arrival.transfer_syntax_uid)
        return IngestResult(Outcome.STORED, ids.study_uid, quiet_until)


def _audit(session: Session, kind: str, arrival: Arrival, detail: str) -> None:
    audit.record(
        session, kind,
        calling_ae=_clip(arrival.calling_ae, 16),
        peer=_clip(arrival.peer, 64),
        study_uid=arrival.ids.study_uid,
        sop_instance_uid=arrival.ids.sop_instance_uid,
        status=0,
        detail=detail,
    )

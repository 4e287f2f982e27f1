"""The outbox table: enqueue, claim due rows, record outcomes, list and retry.

Every state change is one short transaction, so a crash between sending and recording leaves
a `sending` row whose claim lapses and is sent again (the PACS keeps one copy per SOP
Instance UID, so a resend after a crash does not duplicate the object).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import false, func, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.db import audit, wakeups
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Delivery, DeliveryState, utcnow
from dicomnode.dispatch.backoff import retry_delay
from dicomnode.errors import DeliveryNotFoundError, DispatchError
from dicomnode.settings import DispatchSettings
from dicomnode.timefmt import iso_utc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """A row claimed for sending (plain values, usable outside the session)."""

    id: int
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    destination: str
    attempts: int


def enqueue(
    session: Session,
    path: Path | str,
    destination_names: Iterable[str],
    *,
    known_destinations: Iterable[str] | None = None,
    now: datetime | None = None,
) -> list[Delivery]:
    """Add one pending row per destination for the DICOM file at `path`, in `session`'s
    transaction (so results and their deliveries commit together).

    A file already queued for a destination (same SOP Instance UID) is not queued twice.
    """
    names = list(dict.fromkeys(destination_names))
    if known_destinations is not None:
        unknown = sorted(set(names) - set(known_destinations))
        if unknown:
            raise DispatchError(f"unknown destination(s) {unknown}; settings define "
                                f"{sorted(known_destinations)}")
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID", "SOPClassUID",
                                                "StudyInstanceUID"])
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise DispatchError(f"cannot queue {path}: not a readable DICOM file ({exc})") from exc
    uid = str(header.SOPInstanceUID)
    when = now or utcnow()
    rows: list[Delivery] = []
    for name in names:
        existing = session.scalar(
            select(Delivery).where(Delivery.sop_instance_uid == uid,
                                   Delivery.destination == name)
        )
        if existing is not None:
            rows.append(existing)
            continue
        row = Delivery(
            path=str(path), sop_instance_uid=uid, sop_class_uid=str(header.SOPClassUID),
            study_uid=str(header.get("StudyInstanceUID", "")) or None, destination=name,
            state=DeliveryState.PENDING, attempts=0, next_attempt_at=when,
            created_at=when, updated_at=when,
        )
        session.add(row)
        rows.append(row)
        wakeups.mark(session, wakeups.OUTBOX)
    session.flush()
    return rows


def claim_due(
    database: Database, settings: DispatchSettings, owner: str, *, now: datetime | None = None,
    destination: str | None = None, sop_classes: Collection[str] | None = None,
    limit: int | None = None,
) -> list[Claimed]:
    """Claim up to batch_size due rows per destination: pending rows whose time has come and
    sending rows whose claim lapsed. Each claim counts as an attempt.

    `destination`, `sop_classes` and `limit` narrow it (more objects for an association that
    is open to that destination and accepted those classes)."""
    when = now or utcnow()
    lease = timedelta(seconds=settings.lease_seconds)
    per_destination_max = settings.batch_size if limit is None else min(limit,
                                                                        settings.batch_size)
    with database.transaction() as session:
        query = (
            select(Delivery)
            .where(
                or_(Delivery.state == DeliveryState.PENDING,
                    Delivery.state == DeliveryState.SENDING,
                    _slow_retry_due(settings, when)),
                Delivery.next_attempt_at <= when,
            )
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(settings.batch_size * 8)
        )
        if destination is not None:
            query = query.where(Delivery.destination == destination)
        if sop_classes is not None:
            query = query.where(Delivery.sop_class_uid.in_(sorted(sop_classes)))
        if not database.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        claimed: list[Claimed] = []
        per_destination: dict[str, int] = {}
        for row in session.scalars(query):
            if per_destination.get(row.destination, 0) >= per_destination_max:
                continue
            per_destination[row.destination] = per_destination.get(row.destination, 0) + 1
            if row.state == DeliveryState.SENDING:
                logger.warning("delivery %d to %s was left sending by %s; sending again",
                               row.id, row.destination, row.claimed_by)
            row.state = DeliveryState.SENDING
            row.attempts += 1
            row.claimed_by = owner
            row.next_attempt_at = when + lease
            row.updated_at = when
            claimed.append(Claimed(row.id, row.path, row.sop_instance_uid, row.sop_class_uid,
                                   row.destination, row.attempts))
    return claimed


def next_due(database: Database) -> datetime | None:
    """When the earliest pending or sending delivery is next due (a retry's backoff, a
    claim's lapse), or None when there is none."""
    with database.transaction() as session:
        when: datetime | None = session.scalar(
            select(func.min(Delivery.next_attempt_at)).where(
                Delivery.state.in_((DeliveryState.PENDING, DeliveryState.SENDING))))
    return when


def _slow_retry_due(settings: DispatchSettings, when: datetime) -> Any:
    """Failed rows still inside the give-up period are tried again at the slow pace."""
    if settings.give_up_after_hours <= 0:
        return false()
    return (Delivery.state == DeliveryState.FAILED) & (
        Delivery.created_at > when - timedelta(hours=settings.give_up_after_hours))


def due_now(database: Database, destination: str, *, reason: str) -> int:
    """Make a destination's failed and waiting deliveries due at once (it answers again, or
    its settings changed); failed ones keep their state until an attempt succeeds."""
    when = utcnow()
    with database.transaction() as session:
        result = session.execute(
            update(Delivery).where(
                Delivery.destination == destination,
                Delivery.state.in_((DeliveryState.FAILED, DeliveryState.PENDING)),
                Delivery.next_attempt_at > when)
            .values(next_attempt_at=when),
            execution_options={"synchronize_session": False},
        )
        count = int(getattr(result, "rowcount", 0) or 0)
        if count:
            wakeups.mark(session, wakeups.OUTBOX)
            audit.record(session, "deliveries-due", actor="dispatch",
                         detail=f"{count} delivery(ies) to {destination} due now: {reason}")
    return count


def has_failed(database: Database, destination: str) -> bool:
    with database.transaction() as session:
        return session.scalar(
            select(Delivery.id).where(Delivery.destination == destination,
                                      Delivery.state == DeliveryState.FAILED).limit(1)
        ) is not None


def destination_changed(database: Database, name: str, fingerprint: str) -> bool:
    """Whether `name`'s settings differ from those recorded last time (recorded now)."""
    with database.transaction() as session:
        last = session.scalar(
            select(AuditEvent.detail).where(AuditEvent.kind == "destination-settings",
                                            AuditEvent.actor == name)
            .order_by(AuditEvent.id.desc()).limit(1))
        if last == fingerprint:
            return False
        audit.record(session, "destination-settings", actor=name, detail=fingerprint)
        return last is not None


def resume_own(database: Database, owner: str) -> int:
    """Make deliveries `owner` left `sending` (it died mid-send) due now; returns how many."""
    with database.transaction() as session:
        result = session.execute(
            update(Delivery).where(Delivery.state == DeliveryState.SENDING,
                                   Delivery.claimed_by == owner)
            .values(next_attempt_at=utcnow()),
            execution_options={"synchronize_session": False},
        )
        return int(getattr(result, "rowcount", 0) or 0)


def mark_sent(database: Database, delivery_id: int, *, now: datetime | None = None) -> None:
    when = now or utcnow()
    with database.transaction() as session:
        row = session.get(Delivery, delivery_id)
        if row is None:
            return
        row.state = DeliveryState.SENT
        row.sent_at = when
        row.updated_at = when
        row.last_error = None
        row.claimed_by = None


def mark_attempt_failed(
    database: Database, settings: DispatchSettings, delivery_id: int, error: str,
    *, now: datetime | None = None,
) -> str:
    """Record a failed attempt: back to pending with backoff, or failed after the last one.
    Returns the new state."""
    when = now or utcnow()
    with database.transaction() as session:
        row = session.get(Delivery, delivery_id)
        if row is None:
            return DeliveryState.FAILED
        row.last_error = error[:2000]
        row.claimed_by = None
        row.updated_at = when
        if row.attempts >= settings.max_attempts:
            row.state = DeliveryState.FAILED
            # Still tried now and then (claim_due), and at once when the destination answers.
            row.next_attempt_at = when + timedelta(seconds=settings.slow_retry_seconds)
            logger.error("delivery %d of %s to %s failed after %d attempts: %s", row.id,
                         row.sop_instance_uid, row.destination, row.attempts, error)
        else:
            row.state = DeliveryState.PENDING
            row.next_attempt_at = when + retry_delay(settings, row.attempts)
            logger.warning("delivery %d to %s failed (attempt %d of %d), retry at %s: %s",
                           row.id, row.destination, row.attempts, settings.max_attempts,
                           iso_utc(row.next_attempt_at), error)
        return row.state


def retry(
    database: Database, ids: Sequence[int] = (), *, all_failed: bool = False,
    now: datetime | None = None,
) -> list[int]:
    """Make failed deliveries pending again with a fresh attempt count; return their ids.

    Naming a delivery that is not failed is an error (it is pending or already sent)."""
    when = now or utcnow()
    with database.transaction() as session:
        if all_failed:
            rows = list(session.scalars(
                select(Delivery).where(Delivery.state == DeliveryState.FAILED)))
        else:
            rows = []
            for delivery_id in ids:
                row = session.get(Delivery, delivery_id)
                if row is None:
                    raise DeliveryNotFoundError(f"no delivery with id {delivery_id}")
                if row.state != DeliveryState.FAILED:
                    raise DispatchError(
                        f"delivery {delivery_id} is {row.state}, not failed; nothing to retry")
                rows.append(row)
        for row in rows:
            row.state = DeliveryState.PENDING
            row.attempts = 0
            row.next_attempt_at = when
            row.updated_at = when
        if rows:
            wakeups.mark(session, wakeups.OUTBOX)
        return [row.id for row in rows]


def list_deliveries(
    database: Database, state: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Deliveries, newest first, as plain dicts (for the CLI and the web API)."""
    if state is not None and state not in DeliveryState.ALL:
        raise DispatchError(f"unknown state {state!r}; one of {', '.join(DeliveryState.ALL)}")
    with database.transaction() as session:
        query = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Delivery.state == state)
        return [_as_dict(row) for row in session.scalars(query)]


def _as_dict(row: Delivery) -> dict[str, Any]:
    def stamp(value: datetime | None) -> str | None:
        return iso_utc(value)

    return {
        "id": row.id, "destination": row.destination, "state": row.state,
        "attempts": row.attempts, "sop_instance_uid": row.sop_instance_uid,
        "sop_class_uid": row.sop_class_uid, "study_uid": row.study_uid, "path": row.path,
        "next_attempt_at": stamp(row.next_attempt_at), "last_error": row.last_error,
        "created_at": stamp(row.created_at), "sent_at": stamp(row.sent_at),
    }

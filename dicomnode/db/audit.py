"""The audit trail: append-only rows saying what arrived, was refused, or was changed."""

from __future__ import annotations

from sqlalchemy.orm import Session

from dicomnode.db.models import AuditEvent


def record(
    session: Session,
    kind: str,
    *,
    actor: str | None = None,
    calling_ae: str | None = None,
    peer: str | None = None,
    study_uid: str | None = None,
    sop_instance_uid: str | None = None,
    status: int | None = None,
    detail: str | None = None,
) -> AuditEvent:
    """Add one audit row to the session's transaction (committed with it)."""
    event = AuditEvent(
        kind=kind,
        actor=actor,
        calling_ae=calling_ae,
        peer=peer,
        study_uid=study_uid,
        sop_instance_uid=sop_instance_uid,
        status=status,
        detail=detail,
    )
    session.add(event)
    return event

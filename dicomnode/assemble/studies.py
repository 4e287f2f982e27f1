"""The study list shown by `dicomnode studies` (and later the web console)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Study, as_utc

COLUMNS = (
    "study_uid", "patient_id", "calling_ae", "instances", "modalities", "state",
    "created_at", "updated_at", "completed_at",
)


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    patient_id: str | None
    calling_ae: str | None
    instances: int
    modalities: list[str]
    state: str
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        for key in ("created_at", "updated_at", "completed_at"):
            value = row[key]
            row[key] = None if value is None else value.isoformat()
        return row


def list_studies(database: Database) -> list[StudyRow]:
    """Every study, oldest first, with its instance count and modalities."""
    with database.transaction() as session:
        counts = dict(
            session.execute(
                select(Instance.study_id, func.count(Instance.id)).group_by(Instance.study_id)
            ).all()
        )
        modalities: dict[int, set[str]] = {}
        for study_id, modality in session.execute(
            select(Instance.study_id, Instance.modality).distinct()
        ).all():
            if modality:
                modalities.setdefault(study_id, set()).add(modality)
        studies = session.scalars(select(Study).order_by(Study.created_at, Study.id)).all()
        return [
            StudyRow(
                study_uid=study.study_uid,
                patient_id=study.patient_id,
                calling_ae=study.calling_ae,
                instances=int(counts.get(study.id, 0)),
                modalities=sorted(modalities.get(study.id, set())),
                state=study.state,
                created_at=as_utc(study.created_at),
                updated_at=as_utc(study.updated_at),
                completed_at=None if study.completed_at is None else as_utc(study.completed_at),
            )
            for study in studies
        ]

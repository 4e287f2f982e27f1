"""The study list an operator works from (`dicomnode studies`, `GET /api/studies`, the
console): who and what (patient ID, study date, station, calling AE), what ran (the latest
job's preset), where it stands (state); filtered and paged in the database.

The delivery word is added by the callers (results.summary), per page.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Select, func, select

from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Job, Study, as_utc
from dicomnode.errors import DicomNodeError
from dicomnode.timefmt import iso_utc

COLUMNS = (
    "study_uid", "patient_id", "study_date", "station_name", "calling_ae", "instances",
    "modalities", "preset", "state", "created_at", "updated_at", "completed_at",
)
MAX_LIMIT = 1000
_DA = re.compile(r"^\d{8}$")


class FilterError(DicomNodeError):
    """A filter value the list cannot use (the message says which and why)."""


@dataclass(frozen=True)
class StudyFilter:
    state: str | None = None
    date_from: date | None = None  # study date, inclusive
    date_to: date | None = None
    patient_id: str | None = None  # exact
    preset: str | None = None  # the latest job's preset

    @staticmethod
    def parse_date(value: str | None, name: str) -> date | None:
        """`YYYY-MM-DD` (or DICOM's `YYYYMMDD`)."""
        if value is None or not value.strip():
            return None
        text = value.strip()
        try:
            if _DA.match(text):
                return date(int(text[:4]), int(text[4:6]), int(text[6:]))
            return date.fromisoformat(text)
        except ValueError as exc:
            raise FilterError(f"{name}: '{value}' is not a date (YYYY-MM-DD)") from exc


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    patient_id: str | None
    study_date: str | None  # YYYY-MM-DD, from the images' Study Date
    station_name: str | None
    calling_ae: str | None
    instances: int
    modalities: list[str]
    preset: str | None  # of the latest job
    state: str
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    completed_reason: str | None = None
    needs_reprocess: bool = False

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        for key in ("created_at", "updated_at", "completed_at"):
            row[key] = iso_utc(row[key])
        return row


@dataclass(frozen=True)
class StudyPage:
    rows: list[StudyRow]
    total: int  # matching the filter, over all pages
    limit: int
    offset: int


def dashed(value: str | None) -> str | None:
    """DICOM DA `YYYYMMDD` -> `YYYY-MM-DD` (anything else as it is)."""
    if value and _DA.match(value):
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _filtered(query: Select[Any], where: StudyFilter, latest_preset: Any) -> Select[Any]:
    if where.state:
        query = query.where(Study.state == where.state)
    if where.patient_id:
        query = query.where(Study.patient_id == where.patient_id)
    if where.date_from:
        query = query.where(Study.study_date >= where.date_from.strftime("%Y%m%d"))
    if where.date_to:
        query = query.where(Study.study_date <= where.date_to.strftime("%Y%m%d"))
    if where.preset:
        query = query.where(latest_preset == where.preset)
    return query


def list_studies(database: Database, where: StudyFilter | None = None, *, limit: int = 100,
                 offset: int = 0) -> StudyPage:
    """Studies newest first, filtered, one page of them."""
    where = where or StudyFilter()
    limit = max(1, min(int(limit), MAX_LIMIT))
    offset = max(0, int(offset))
    latest_job = (select(Job.preset).where(Job.study_id == Study.id)
                  .order_by(Job.id.desc()).limit(1).correlate(Study).scalar_subquery())
    with database.transaction() as session:
        total = int(session.scalar(_filtered(
            select(func.count()).select_from(Study), where, latest_job)) or 0)
        rows = session.execute(_filtered(
            select(Study, latest_job.label("preset")), where, latest_job)
            .order_by(Study.id.desc()).limit(limit).offset(offset)).all()
        ids = [study.id for study, _ in rows]
        counts = dict(session.execute(
            select(Instance.study_id, func.count(Instance.id))
            .where(Instance.study_id.in_(ids)).group_by(Instance.study_id)).all())
        modalities: dict[int, set[str]] = {}
        for study_id, modality in session.execute(
            select(Instance.study_id, Instance.modality).where(Instance.study_id.in_(ids))
            .distinct()
        ).all():
            if modality:
                modalities.setdefault(study_id, set()).add(modality)
        out = [
            StudyRow(
                study_uid=study.study_uid, patient_id=study.patient_id,
                study_date=dashed(study.study_date), station_name=study.station_name,
                calling_ae=study.calling_ae, instances=int(counts.get(study.id, 0)),
                modalities=sorted(modalities.get(study.id, set())), preset=preset,
                state=study.state, created_at=as_utc(study.created_at),
                updated_at=as_utc(study.updated_at),
                completed_at=None if study.completed_at is None else as_utc(study.completed_at),
                completed_reason=study.completed_reason,
                needs_reprocess=bool(study.needs_reprocess),
            )
            for study, preset in rows
        ]
    return StudyPage(out, total, limit, offset)

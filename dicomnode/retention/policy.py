"""Which studies' files may go, and why: the retention plan (nothing is deleted here).

A study is classified from its state and the delivery summary of its latest job:

- `busy`: receiving, complete, processing, waiting for re-processing (late instances), or its
  results are still on their way (`waiting`, `sending`): never purged;
- `finished`: its results were delivered, or there was nothing to deliver (not routed, a
  preset without destinations): purged after `received_days` / `results_days`, and first
  under disk pressure;
- `failed`: processing failed, or its encoding or a delivery failed and waits for an
  operator: kept `keep_failed_days` (for ever when unset), then purged like a finished one.

Ages count from the study's last received instance, read from an injectable clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.db.models import Instance, Result, Study, StudyState, as_utc
from dicomnode.results import summary
from dicomnode.settings import RetentionSettings

BUSY, FINISHED, FAILED = "busy", "finished", "failed"
RECEIVED, RESULTS = "received", "results"  # what a purge deletes
_BUSY_STATES = {StudyState.RECEIVING, StudyState.COMPLETE, StudyState.PROCESSING}


@dataclass(frozen=True)
class Candidate:
    study_uid: str
    state: str
    kind: str  # received | results
    reason: str  # age | failed-age | disk-pressure
    last_instance_at: datetime
    files: int
    bytes: int


def classify(state: str, needs_reprocess: bool, delivery: summary.DeliverySummary | None
             ) -> str:
    if state in _BUSY_STATES or needs_reprocess:
        return BUSY
    if state == StudyState.NOT_ROUTED:
        return FINISHED
    if state == StudyState.FAILED:
        return FAILED
    if delivery is None or delivery.state is None:
        # done/partial with nothing to deliver (a preset without destinations); a failed
        # job shows as state failed above.
        return FINISHED
    if delivery.state == summary.DELIVERED:
        return FINISHED
    if delivery.state == summary.FAILED:
        return FAILED
    return BUSY  # waiting | sending


@dataclass(frozen=True)
class _Row:
    study_uid: str
    state: str
    classification: str
    last_instance_at: datetime
    received_files: int
    received_bytes: int
    result_files: int


def _rows(session: Session, max_attempts: int) -> list[_Row]:
    studies = session.execute(
        select(Study.study_uid, Study.state, Study.needs_reprocess, Study.last_instance_at)
        .order_by(Study.last_instance_at, Study.id)
    ).all()
    deliveries = summary.summarise(session, max_attempts=max_attempts)
    received = {
        uid: (int(n), int(size or 0)) for uid, n, size in session.execute(
            select(Study.study_uid, func.count(Instance.id), func.sum(Instance.size_bytes))
            .join(Instance, Instance.study_id == Study.id)
            .where(Instance.purged_at.is_(None)).group_by(Study.study_uid))
    }
    results = dict(session.execute(
        select(Result.study_uid, func.count(Result.id)).where(Result.purged_at.is_(None))
        .group_by(Result.study_uid)).all())
    rows = []
    for uid, state, reprocess, last in studies:
        files, size = received.get(uid, (0, 0))
        rows.append(_Row(uid, state, classify(state, bool(reprocess), deliveries.get(uid)),
                         as_utc(last), files, size, int(results.get(uid, 0))))
    return rows


def _old(row: _Row, now: datetime, days: float | None, keep_failed: float | None) -> str | None:
    """The reason a study is old enough for a purge by age, or None."""
    if row.classification == BUSY or days is None:
        return None
    if row.classification == FAILED:
        if keep_failed is None or now - row.last_instance_at < timedelta(days=keep_failed):
            return None
        return "failed-age" if now - row.last_instance_at >= timedelta(days=days) else None
    return "age" if now - row.last_instance_at >= timedelta(days=days) else None


def plan(session: Session, settings: RetentionSettings, now: datetime, *, max_attempts: int
         ) -> tuple[list[Candidate], list[Candidate]]:
    """(purges due by age, studies that may go under disk pressure, oldest first)."""
    by_age: list[Candidate] = []
    spare: list[Candidate] = []
    for row in _rows(session, max_attempts):
        if row.received_files:  # unpurged instances (also ones arriving after a purge)
            reason = _old(row, now, settings.received_days, settings.keep_failed_days)
            candidate = Candidate(row.study_uid, row.state, RECEIVED, reason or "disk-pressure",
                                  row.last_instance_at, row.received_files, row.received_bytes)
            if reason is not None:
                by_age.append(candidate)
            elif row.classification == FINISHED:
                spare.append(candidate)
        if row.result_files:
            reason = _old(row, now, settings.results_days, settings.keep_failed_days)
            if reason is not None:
                by_age.append(Candidate(row.study_uid, row.state, RESULTS, reason,
                                        row.last_instance_at, row.result_files, 0))
    return by_age, spare

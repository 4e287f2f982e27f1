"""Per study: how far its latest job's results got on the way to the destinations.

Derived, not stored: from the latest job of the study, its result set and the outbox rows of
its result objects. The study's own state says whether the models ran; this says whether the
PACS has the findings:

- `waiting`: the job is queued or running, or its results are not encoded yet (including an
  encoding that failed while the pipeline will still try it again: `attempts` below
  `max_attempts`, with `last_error`);
- `sending`: encoded, and some deliveries are still pending;
- `delivered`: encoded, and every delivery was sent;
- `failed`: the encoding failed `max_attempts` times, or a delivery failed (only an operator
  retry moves it on);
- none: nothing to deliver (no job, a failed job, or a preset without destinations).

The attempt limit is the caller's (`settings.results.max_attempts`), so the word agrees with
the pipeline that reads the same setting.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.db.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    ResultSet,
    ResultSetState,
)
from dicomnode.results.bookkeeping import ENCODABLE

WAITING = "waiting"
SENDING = "sending"
DELIVERED = "delivered"
FAILED = "failed"


@dataclass(frozen=True)
class DeliverySummary:
    job_id: int
    results: str | None  # pending | encoded | failed; None: the job has nothing to encode
    sent: int
    pending: int  # pending or being sent
    failed: int
    state: str | None  # waiting | sending | delivered | failed | None (nothing to deliver)
    attempts: int = 0  # encoding attempts of the result set (0: not tried, or queued again)
    max_attempts: int = 0  # the pipeline's limit, after which `failed` waits for an operator
    last_error: str | None = None  # why the last encoding attempt failed

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _word(results: str | None, exhausted: bool, sent: int, pending: int, failed: int
          ) -> str | None:
    if results is None:
        return None
    if (results == ResultSetState.FAILED and exhausted) or failed:
        return FAILED
    # A failed encoding with attempts left is the pipeline's to retry: still on its way.
    if results != ResultSetState.ENCODED:
        return WAITING
    if pending:
        return SENDING
    return DELIVERED if sent else None


def summarise(
    session: Session, study_uids: Collection[str] | None = None, *, max_attempts: int
) -> dict[str, DeliverySummary]:
    """Summaries by Study Instance UID (every study with a job, or only `study_uids`);
    `max_attempts` is the results pipeline's (settings.results.max_attempts)."""
    latest = select(func.max(Job.id).label("job_id")).group_by(Job.study_uid)
    if study_uids is not None:
        if not study_uids:
            return {}
        latest = latest.where(Job.study_uid.in_(list(study_uids)))
    latest_ids = latest.subquery()
    jobs = session.execute(
        select(Job.id, Job.study_uid, Job.state, Job.output_path, ResultSet.state,
               ResultSet.attempts, ResultSet.error)
        .join(latest_ids, latest_ids.c.job_id == Job.id)
        .outerjoin(ResultSet, ResultSet.job_id == Job.id)
    ).all()
    counts: dict[int, dict[str, int]] = {}
    for job_id, state, n in session.execute(
        select(Result.job_id, Delivery.state, func.count())
        .join(Delivery, Delivery.sop_instance_uid == Result.sop_instance_uid)
        .join(latest_ids, latest_ids.c.job_id == Result.job_id)
        .group_by(Result.job_id, Delivery.state)
    ).all():
        counts.setdefault(int(job_id), {})[str(state)] = int(n)
    summaries = {}
    for job_id, study_uid, job_state, output_path, set_state, attempts, error in jobs:
        by_state = counts.get(int(job_id), {})
        sent = by_state.get(DeliveryState.SENT, 0)
        pending = by_state.get(DeliveryState.PENDING, 0) + by_state.get(DeliveryState.SENDING, 0)
        failed = by_state.get(DeliveryState.FAILED, 0)
        results: str | None
        if job_state in (JobState.QUEUED, JobState.RUNNING):
            results = ResultSetState.PENDING
        elif job_state not in ENCODABLE or output_path is None:
            results = None  # the job failed: nothing was, or will be, encoded
        else:
            results = set_state or ResultSetState.PENDING
        tries = int(attempts or 0)
        word = _word(results, tries >= max_attempts, sent, pending, failed)
        summaries[str(study_uid)] = DeliverySummary(
            int(job_id), results, sent, pending, failed, word, tries, max_attempts,
            error if results == ResultSetState.FAILED else None)
    return summaries

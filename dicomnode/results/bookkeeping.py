"""The results pipeline's work list, and the operator's view of it: list result sets, queue
failed ones again (`dicomnode results list`, `dicomnode results retry`, and the same retry
from the API and console: `POST /api/jobs/{id}/results/retry`).

The work list is the database: finished jobs with outputs and no encoded result set. A
retry only changes rows (state `pending`, attempts 0), so a running node's pipeline, which
polls the table, encodes the job again at its next pass; no node needs to be told.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from dicomnode.db import audit, wakeups
from dicomnode.db.engine import Database
from dicomnode.db.models import Job, JobState, ResultSet, ResultSetState, as_utc, utcnow
from dicomnode.errors import DicomNodeError, JobNotFoundError
from dicomnode.timefmt import iso_utc

logger = logging.getLogger(__name__)

ENCODABLE = (JobState.DONE, JobState.PARTIAL)


class RetryRefused(DicomNodeError):
    """A named job has no failed result set to retry (the message says what it has)."""


def encodable() -> ColumnElement[bool]:
    """A job the pipeline may encode: finished with outputs kept."""
    return and_(Job.state.in_(ENCODABLE), Job.output_path.is_not(None))


def work_list(
    session: Session, *, max_attempts: int, retry_seconds: float, now: datetime | None = None
) -> list[int]:
    """Job ids to encode, oldest first: never tried, queued again by an operator, or failed
    with attempts left once `retry_seconds` have passed since the last attempt."""
    due = (now or utcnow()) - timedelta(seconds=retry_seconds)
    rows = session.execute(
        select(Job.id, ResultSet.state, ResultSet.finished_at)
        .outerjoin(ResultSet, ResultSet.job_id == Job.id)
        .where(encodable(),
               or_(ResultSet.id.is_(None),
                   ResultSet.state == ResultSetState.PENDING,
                   and_(ResultSet.state == ResultSetState.FAILED,
                        ResultSet.attempts < max_attempts)))
        .order_by(Job.id)
    ).all()
    pending = []
    for job_id, state, finished in rows:
        if state == ResultSetState.FAILED and finished is not None and as_utc(finished) > due:
            continue  # failed recently: wait before trying again
        pending.append(int(job_id))
    return pending


def list_result_sets(
    database: Database, state: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Result sets, newest job first, as plain dicts; a finished job not yet tried is listed
    as `pending` with no attempts (it is on the work list all the same)."""
    if state is not None and state not in ResultSetState.ALL:
        raise DicomNodeError(f"unknown state {state!r}; one of {', '.join(ResultSetState.ALL)}")
    with database.transaction() as session:
        query = (
            select(Job, ResultSet)
            .outerjoin(ResultSet, ResultSet.job_id == Job.id)
            .where(or_(ResultSet.id.is_not(None), encodable()))
            .order_by(Job.id.desc()).limit(limit)
        )
        if state == ResultSetState.PENDING:
            query = query.where(or_(ResultSet.id.is_(None),
                                    ResultSet.state == ResultSetState.PENDING))
        elif state is not None:
            query = query.where(ResultSet.state == state)
        return [_as_dict(job, result_set) for job, result_set in session.execute(query)]


def result_set_of(database: Database, job_id: int) -> dict[str, Any]:
    """One job's result set as `list_result_sets` shows it (JobNotFoundError if no job)."""
    with database.transaction() as session:
        return _as_dict(*_job_and_set(session, job_id))


def _job_and_set(session: Session, job_id: int) -> tuple[Job, ResultSet | None]:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id}")
    return job, session.scalar(select(ResultSet).where(ResultSet.job_id == job_id))


def _as_dict(job: Job, result_set: ResultSet | None) -> dict[str, Any]:
    def stamp(value: datetime | None) -> str | None:
        return iso_utc(value)

    if result_set is None:
        return {"job_id": job.id, "study_uid": job.study_uid, "job_state": job.state,
                "state": ResultSetState.PENDING, "attempts": 0, "last_error": None,
                "updated_at": stamp(job.finished_at)}
    return {
        "job_id": job.id, "study_uid": job.study_uid, "job_state": job.state,
        "state": result_set.state, "attempts": result_set.attempts,
        "last_error": result_set.error,
        "updated_at": stamp(result_set.finished_at or result_set.started_at),
    }


def retry(
    database: Database, job_ids: Sequence[int] = (), *, all_failed: bool = False,
    actor: str, now: datetime | None = None,
) -> list[int]:
    """Queue failed result sets for encoding again (state pending, attempts 0), with an
    audit row each; return their job ids. Naming a job without a failed result set is
    refused, and then nothing changes."""
    when = now or utcnow()
    with database.transaction() as session:
        if all_failed:
            rows = list(session.scalars(
                select(ResultSet).join(Job, Job.id == ResultSet.job_id)
                .where(ResultSet.state == ResultSetState.FAILED, encodable())
                .order_by(ResultSet.job_id)))
        else:
            rows = [_failed_set(session, job_id) for job_id in dict.fromkeys(job_ids)]
        for row in rows:
            audit.record(
                session, "results-retry", actor=actor, study_uid=row.study_uid,
                detail=f"job {row.job_id}: encoding queued again after {row.attempts} "
                       f"failed attempt(s); last error: {row.error or '-'}"[:4000])
            row.state = ResultSetState.PENDING
            row.attempts = 0
            row.started_at = when  # "updated": when it was queued again
            row.finished_at = None
        ids = [row.job_id for row in rows]
        if ids:
            wakeups.mark(session, wakeups.RESULTS)
    if ids:
        logger.info("results of job(s) %s queued for encoding again by %s",
                    ", ".join(map(str, ids)), actor)
    return ids


def _failed_set(session: Session, job_id: int) -> ResultSet:
    job, result_set = _job_and_set(session, job_id)
    if job.state not in ENCODABLE or not job.output_path:
        why = f"job {job_id} is {job.state} with no outputs to encode"
    elif result_set is not None and result_set.state == ResultSetState.FAILED:
        return result_set
    elif result_set is not None and result_set.state == ResultSetState.ENCODED:
        why = f"job {job_id}'s results are already encoded"
    else:
        why = f"job {job_id}'s results are waiting to be encoded"
    raise RetryRefused(f"{why}; it has no failed result set to retry")

"""The job queue in the database: enqueue, claim with a lease, renew, finish.

- Enqueue is one conditional UPDATE on the study (complete -> processing, or a finished study
  with `needs_reprocess` -> processing) plus the job INSERT, in one transaction: of two
  callers (hook and sweep, or two nodes) exactly one creates the job.
- Claim takes the oldest queued job, or a running one whose lease has lapsed (its worker
  died), with `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite the statement is
  plain and BEGIN IMMEDIATE serialises claimers, which is just as atomic.
- Finish is conditional on still holding the claim: a worker that lost its lease (paused,
  then another worker took over) cannot record a second completion. Model-run rows are
  written in that same transaction, so a job's records appear exactly once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.db import audit, wakeups
from dicomnode.db.engine import Database
from dicomnode.db.models import Job, JobState, ModelRun, Study, StudyState, as_utc, utcnow
from dicomnode.errors import JobNotFoundError
from dicomnode.inference.executor import GraphResult
from dicomnode.jobs.planning import Plan
from dicomnode.timefmt import iso_utc

logger = logging.getLogger(__name__)

COMPLETE = "complete"
LATE = "late-instances"
# Study states after which late instances make a new job.
_FINAL_STUDY_STATES = (
    StudyState.DONE, StudyState.PARTIAL, StudyState.FAILED, StudyState.NOT_ROUTED,
)


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_uid: str
    preset: str | None
    graph: dict[str, Any]
    attempt: int
    worker: str


def _updated(result: Any) -> bool:
    return int(getattr(result, "rowcount", 0) or 0) == 1


def studies_to_plan(database: Database, *,
                    late_quiet_seconds: Callable[[str | None], float] = lambda _preset: 0.0
                    ) -> list[tuple[str, str]]:
    """(study_uid, reason) of studies that need a job: complete ones nobody planned (missed
    notification, crash), and finished ones that received late instances, once none has come
    for `late_quiet_seconds(preset)` (a camera re-sending several images makes one re-run, not
    one per image and one new report in the PACS each); `preset` is the one the study's latest
    job ran (None: never routed), so a preset's own quiet period holds for its late images."""
    now = utcnow()
    with database.transaction() as session:
        complete = session.scalars(
            select(Study.study_uid).where(Study.state == StudyState.COMPLETE).order_by(Study.id)
        ).all()
        latest_job = (select(Job.preset).where(Job.study_id == Study.id)
                      .order_by(Job.id.desc()).limit(1).correlate(Study).scalar_subquery())
        candidates = session.execute(
            select(Study.study_uid, Study.last_instance_at, latest_job).where(
                Study.needs_reprocess.is_(True), Study.state.in_(_FINAL_STUDY_STATES),
            ).order_by(Study.id)
        ).all()
    late = [uid for uid, last, preset in candidates
            if as_utc(last) <= now - timedelta(seconds=late_quiet_seconds(preset))]
    return [(uid, COMPLETE) for uid in complete] + [(uid, LATE) for uid in late]


def enqueue(database: Database, plan: Plan, reason: str) -> int | None:
    """Record the plan for a study; return the new job id (None: not routed, or lost race)."""
    with database.transaction() as session:
        now = utcnow()
        condition = _plan_condition(reason)
        if plan.graph is not None:
            new_state = StudyState.PROCESSING
        elif plan.decision is not None and plan.decision.preset is None:
            new_state = StudyState.NOT_ROUTED
        else:
            new_state = StudyState.FAILED  # routed, but the preset's graph cannot be made
        won = session.execute(
            update(Study).where(Study.study_uid == plan.study_uid, condition)
            .values(state=new_state, needs_reprocess=False, updated_at=now),
            execution_options={"synchronize_session": False},
        )
        if not _updated(won):
            return None
        if plan.graph is None:
            kind = "not-routed" if new_state == StudyState.NOT_ROUTED else "not-processed"
            audit.record(session, kind, actor="processing", study_uid=plan.study_uid,
                         detail=plan.reason)
            logger.info("study %s %s: %s", plan.study_uid, kind, plan.reason)
            return None
        study_id = session.scalar(select(Study.id).where(Study.study_uid == plan.study_uid))
        job = Job(
            study_id=study_id,
            study_uid=plan.study_uid,
            preset=plan.preset,
            graph_json=json.dumps(plan.graph.to_dict(), sort_keys=True),
            state=JobState.QUEUED,
            reason=reason,
            attempts=0,
            created_at=now,
        )
        session.add(job)
        session.flush()
        wakeups.mark(session, wakeups.JOBS)
        models = ", ".join(f"{m}@{v}" for m, v in plan.graph.models.items())
        audit.record(session, "job-queued", actor="processing", study_uid=plan.study_uid,
                     detail=f"job {job.id} ({reason}): preset {plan.preset}; {models}; "
                            f"{plan.reason}")
        logger.info("study %s: job %d queued (%s)", plan.study_uid, job.id, reason)
        return job.id


def _plan_condition(reason: str) -> Any:
    return (
        (Study.state == StudyState.COMPLETE) if reason == COMPLETE
        else (Study.needs_reprocess.is_(True) & Study.state.in_(_FINAL_STUDY_STATES))
    )


def fail_unplannable(database: Database, study_uid: str, reason: str, error: str) -> int | None:
    """A study that cannot be planned (routing or resolution raised) goes `failed` with a failed
    job row that says why (`dicomnode job show`, the API), so it never blocks the queue and an
    operator can see and re-run it. `error` must already be free of data set values.
    Returns the job id (None: another caller planned the study first)."""
    with database.transaction() as session:
        now = utcnow()
        won = session.execute(
            update(Study).where(Study.study_uid == study_uid, _plan_condition(reason))
            .values(state=StudyState.FAILED, needs_reprocess=False, updated_at=now),
            execution_options={"synchronize_session": False},
        )
        if not _updated(won):
            return None
        study_id = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        outcome = {"outcome": JobState.FAILED, "problems": {"(planning)": error}}
        job = Job(
            study_id=study_id, study_uid=study_uid, preset=None,
            graph_json=json.dumps({"stages": [], "models": {}}),
            state=JobState.FAILED, reason=reason, attempts=0, created_at=now,
            finished_at=now, outcome_json=json.dumps(outcome, sort_keys=True),
        )
        session.add(job)
        session.flush()
        audit.record(session, "job-failed", actor="processing", study_uid=study_uid,
                     detail=f"job {job.id} failed: planning: {error}"[:4000])
    logger.warning("study %s: cannot be planned, failed (job %d): %s", study_uid, job.id, error)
    return int(job.id)


def resume_own(database: Database, worker_prefix: str) -> int:
    """Hand back to the queue the running jobs claimed by workers named `worker_prefix...`:
    the caller holds that identity (dicomnode.identity), so their runs died with its previous
    process. Each counts as an attempt (a job that keeps killing its worker is bounded)."""
    with database.transaction() as session:
        result = session.execute(
            update(Job).where(Job.state == JobState.RUNNING,
                              Job.claimed_by.startswith(worker_prefix, autoescape=True))
            .values(state=JobState.QUEUED, claimed_by=None, lease_until=None),
            execution_options={"synchronize_session": False},
        )
        return int(getattr(result, "rowcount", 0) or 0)


def _give_up(session: Session, job: Job, now: datetime, max_attempts: int) -> None:
    """A job that ended its worker `max_attempts` times fails instead of running again."""
    reason = (f"the job ended its worker {job.attempts} time(s) (crash, kill or lapsed "
              f"lease; inference.max_job_attempts is {max_attempts})")
    job.state = JobState.FAILED
    job.finished_at = now
    job.lease_until = None
    job.outcome_json = json.dumps({"outcome": JobState.FAILED, "problems": {"(job)": reason}},
                                  sort_keys=True)
    session.execute(
        update(Study).where(Study.study_uid == job.study_uid,
                            Study.state == StudyState.PROCESSING)
        .values(state=StudyState.FAILED, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    audit.record(session, "job-failed", actor="processing", study_uid=job.study_uid,
                 detail=f"job {job.id} failed: {reason}")
    logger.error("job %d (study %s) failed: %s", job.id, job.study_uid, reason)


def claim(database: Database, worker: str, lease_seconds: float,
          max_attempts: int | None = None) -> ClaimedJob | None:
    """Claim the oldest runnable job for `worker`, or None when there is none. A runnable job
    that already used `max_attempts` attempts is failed instead (and the next one claimed)."""
    with database.transaction() as session:
        now = utcnow()
        runnable = or_(
            # A queued job's lease_until, when set, is "not before" (a requeue's backoff).
            (Job.state == JobState.QUEUED) & (
                Job.lease_until.is_(None) | (Job.lease_until < now)),
            (Job.state == JobState.RUNNING) & (Job.lease_until < now),
        )
        while True:
            job = session.execute(
                select(Job).where(runnable).order_by(Job.id).limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if job is None:
                return None
            if max_attempts is not None and job.attempts >= max_attempts:
                _give_up(session, job, now, max_attempts)
                session.flush()
                continue
            break
        if job.state == JobState.RUNNING:
            logger.warning("job %d: lease of %s lapsed; taking it over", job.id, job.claimed_by)
        job.state = JobState.RUNNING
        job.claimed_by = worker
        job.lease_until = now + timedelta(seconds=lease_seconds)
        job.attempts = job.attempts + 1
        job.started_at = now
        return ClaimedJob(job.id, job.study_uid, job.preset, json.loads(job.graph_json),
                          job.attempts, worker)


def renew(database: Database, job_id: int, worker: str, lease_seconds: float) -> bool:
    """Extend the lease; False when the claim was lost (another worker took the job)."""
    with database.transaction() as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.claimed_by == worker,
                              Job.state == JobState.RUNNING)
            .values(lease_until=utcnow() + timedelta(seconds=lease_seconds)),
            execution_options={"synchronize_session": False},
        )
        return _updated(result)


def requeue(database: Database, job: ClaimedJob, why: str, delay_seconds: float) -> bool:
    """Put a claimed job back in the queue, claimable after `delay_seconds`: a transient
    failure (the inference server is unavailable), not the job's end. Nothing else is
    recorded, so a later attempt records the results exactly once, and the attempt is not
    counted against `inference.max_job_attempts` (waiting for a server is not a crash).
    False if the claim was lost.
    """
    with database.transaction() as session:
        now = utcnow()
        won = session.execute(
            update(Job).where(Job.id == job.id, Job.claimed_by == job.worker,
                              Job.state == JobState.RUNNING)
            .values(state=JobState.QUEUED, claimed_by=None,
                    lease_until=now + timedelta(seconds=delay_seconds),
                    attempts=Job.attempts - 1,
                    outcome_json=json.dumps({"waiting": why[:2000]}, sort_keys=True)),
            execution_options={"synchronize_session": False},
        )
        if not _updated(won):
            return False
        audit.record(session, "job-waiting", actor=job.worker, study_uid=job.study_uid,
                     detail=f"job {job.id} attempt {job.attempt}: {why}"[:4000])
    return True


def release(database: Database, job: ClaimedJob) -> bool:
    """Give a claimed job back to the queue untouched (its run could not reach the database);
    the attempt it used is not counted against it."""
    with database.transaction() as session:
        result = session.execute(
            update(Job).where(Job.id == job.id, Job.claimed_by == job.worker,
                              Job.state == JobState.RUNNING)
            .values(state=JobState.QUEUED, claimed_by=None, lease_until=None,
                    attempts=Job.attempts - 1),
            execution_options={"synchronize_session": False},
        )
        released = _updated(result)
        if released:
            wakeups.mark(session, wakeups.JOBS)
        return released


def _study_state(outcome: str) -> str:
    return {"done": StudyState.DONE, "partial": StudyState.PARTIAL}.get(outcome, StudyState.FAILED)


def finish(
    database: Database,
    job: ClaimedJob,
    result: GraphResult | None,
    outcome: dict[str, Any],
    output_path: str | None,
) -> bool:
    """Record the end of a job (and its model runs) once; False if the claim was lost."""
    state = outcome["outcome"]
    with database.transaction() as session:
        now = utcnow()
        won = session.execute(
            update(Job).where(Job.id == job.id, Job.claimed_by == job.worker,
                              Job.state == JobState.RUNNING)
            .values(state=state, finished_at=now, lease_until=None,
                    outcome_json=json.dumps(outcome, sort_keys=True), output_path=output_path),
            execution_options={"synchronize_session": False},
        )
        if not _updated(won):
            logger.warning("job %d: claim lost before finishing; another worker has it", job.id)
            return False
        if result is not None:
            _add_runs(session, job.id, result)
        if output_path is not None and state in (JobState.DONE, JobState.PARTIAL):
            wakeups.mark(session, wakeups.RESULTS)  # the encoder's work
        session.execute(
            update(Study).where(Study.study_uid == job.study_uid,
                                Study.state == StudyState.PROCESSING)
            .values(state=_study_state(state), updated_at=now),
            execution_options={"synchronize_session": False},
        )
        problems = outcome.get("problems") or {}
        detail = f"job {job.id} {state}" + (
            "; " + "; ".join(f"{m}: {why}" for m, why in sorted(problems.items()))
            if problems else "")
        audit.record(session, f"job-{state}", actor=job.worker, study_uid=job.study_uid,
                     detail=detail[:4000])
    logger.info("job %d %s (study %s)", job.id, state, job.study_uid)
    return True


def _add_runs(session: Session, job_id: int, result: GraphResult) -> None:
    for model_id in result.graph.order:
        run = result.models.get(model_id)
        if run is None:
            continue
        session.add(ModelRun(
            job_id=job_id,
            model_id=run.model_id,
            version=run.version,
            provider=run.provider,
            images=len(run.run_images),
            batch_size=run.batch_size,
            started_at=run.started_at,
            finished_at=run.finished_at,
            duration_ms=run.duration_ms,
            status=run.status,
            error=run.error,
            skipped_json=json.dumps(run.skipped, sort_keys=True) if run.skipped else None,
            not_analysed_json=json.dumps(
                {uid: r.to_dict() for uid, r in run.not_analysed.items()}, sort_keys=True,
            ) if run.not_analysed else None,
        ))


# -- reading -----------------------------------------------------------------------------------


def _job_dict(job: Job) -> dict[str, Any]:
    graph = json.loads(job.graph_json)
    return {
        "id": job.id,
        "study_uid": job.study_uid,
        "preset": job.preset,
        "state": job.state,
        "reason": job.reason,
        "attempts": job.attempts,
        "claimed_by": job.claimed_by,
        "lease_until": _iso(job.lease_until),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "models": graph.get("models", {}),
        "output_path": job.output_path,
    }


def _iso(value: datetime | None) -> str | None:
    return iso_utc(value)


def list_jobs(database: Database, limit: int = 100) -> list[dict[str, Any]]:
    with database.transaction() as session:
        jobs = session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)).all()
        return [_job_dict(j) for j in jobs]


def job_detail(database: Database, job_id: int) -> dict[str, Any]:
    with database.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        data = _job_dict(job)
        data["graph"] = json.loads(job.graph_json)
        data["outcome"] = json.loads(job.outcome_json) if job.outcome_json else None
        runs = session.scalars(
            select(ModelRun).where(ModelRun.job_id == job_id).order_by(ModelRun.id)
        ).all()
        data["runs"] = [
            {
                "model_id": r.model_id,
                "version": r.version,
                "provider": r.provider,
                "images": r.images,
                "batch_size": r.batch_size,
                "started_at": _iso(r.started_at),
                "finished_at": _iso(r.finished_at),
                "duration_ms": r.duration_ms,
                "status": r.status,
                "error": r.error,
                "skipped": json.loads(r.skipped_json) if r.skipped_json else {},
                "not_analysed": json.loads(r.not_analysed_json) if r.not_analysed_json else {},
            }
            for r in runs
        ]
        data["not_analysed"] = not_analysed_by_image(data["runs"])
        return data


def not_analysed_by_image(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per image, the models that did not analyse it, with the coded reason (sorted)."""
    rows = [
        {"sop_instance_uid": uid, "model_id": run["model_id"], "version": run["version"],
         "scheme": reason["scheme"], "code": reason["value"], "meaning": reason["meaning"],
         "detail": reason["detail"]}
        for run in runs for uid, reason in run["not_analysed"].items()
    ]
    return sorted(rows, key=lambda r: (r["sop_instance_uid"], r["model_id"]))


def queue_depth(database: Database) -> dict[str, int]:
    """Jobs by state (queued and running are the queue)."""
    with database.transaction() as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {str(state): int(count) for state, count in rows}

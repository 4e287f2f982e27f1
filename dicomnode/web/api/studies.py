"""Studies and what happened to them; operator retry of a failed delivery."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from sqlalchemy import func, select

from dicomnode.db.audit import record
from dicomnode.db.models import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    Result,
    Study,
    StudyState,
    as_utc,
)
from dicomnode.dispatch import outbox
from dicomnode.errors import DeliveryNotFoundError, DispatchError
from dicomnode.jobs.queue import job_detail
from dicomnode.results.summary import summarise
from dicomnode.web import results_view
from dicomnode.web.deps import Admin, State, Viewer
from dicomnode.web.results_view import ViewError

logger = logging.getLogger(__name__)

router = APIRouter(tags=["studies"])

STATES = (
    StudyState.RECEIVING, StudyState.COMPLETE, StudyState.PROCESSING, StudyState.DONE,
    StudyState.PARTIAL, StudyState.FAILED, StudyState.NOT_ROUTED,
)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else as_utc(value).isoformat()


def _study_row(study: Study, instances: int) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid, "patient_id": study.patient_id,
        "calling_ae": study.calling_ae, "state": study.state, "instances": instances,
        "created_at": _iso(study.created_at), "updated_at": _iso(study.updated_at),
        "completed_at": _iso(study.completed_at), "completed_reason": study.completed_reason,
        "needs_reprocess": study.needs_reprocess,
    }


@router.get("/studies", summary="Studies, newest first; filter by state")
def list_studies(state: State, _: Viewer, study_state: str | None = None, limit: int = 200
                 ) -> dict[str, Any]:
    if study_state is not None and study_state not in STATES:
        raise HTTPException(422, f"unknown state '{study_state}' (one of {', '.join(STATES)})")
    limit = max(1, min(limit, 1000))
    with state.database.transaction() as session:
        counts = (
            select(Instance.study_id, func.count().label("n"))
            .group_by(Instance.study_id).subquery()
        )
        query = (
            select(Study, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.study_id == Study.id)
            .order_by(Study.id.desc()).limit(limit)
        )
        if study_state is not None:
            query = query.where(Study.state == study_state)
        rows = [_study_row(study, int(n)) for study, n in session.execute(query)]
        # Derived per study: how far the latest job's results got (results.summary).
        summaries = summarise(session, [row["study_uid"] for row in rows],
                              max_attempts=state.settings.results.max_attempts)
        for row in rows:
            summary = summaries.get(row["study_uid"])
            row["delivery"] = None if summary is None else summary.as_json()
        by_state = dict(session.execute(
            select(Study.state, func.count()).group_by(Study.state)).all())
    return {"studies": rows, "states": {s: int(by_state.get(s, 0)) for s in STATES}}


@router.get("/studies/{study_uid}", summary="Timeline, images, jobs with model runs, results, "
            "deliveries")
def get_study(study_uid: str, state: State, _: Viewer) -> dict[str, Any]:
    with state.database.transaction() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise HTTPException(404, f"no study {study_uid}")
        instances = session.scalars(
            select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)).all()
        job_ids = list(session.scalars(
            select(Job.id).where(Job.study_id == study.id).order_by(Job.id)))
        results = session.scalars(
            select(Result).where(Result.study_uid == study_uid).order_by(Result.id)).all()
        deliveries = session.scalars(
            select(Delivery).where(Delivery.study_uid == study_uid).order_by(Delivery.id)).all()
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.study_uid == study_uid)
            .order_by(AuditEvent.id)).all()
        data = _study_row(study, len(instances))
        summary = summarise(session, [study_uid],
                            max_attempts=state.settings.results.max_attempts).get(study_uid)
        data["delivery"] = None if summary is None else summary.as_json()
        data["images"] = [
            {"sop_instance_uid": i.sop_instance_uid, "modality": i.modality,
             "laterality": i.laterality, "received_at": _iso(i.received_at), "late": i.late,
             "size_bytes": i.size_bytes}
            for i in instances
        ]
        data["results"] = [
            {"id": r.id, "job_id": r.job_id, "kind": r.kind,
             "sop_instance_uid": r.sop_instance_uid, "source_uid": r.source_uid,
             "created_at": _iso(r.created_at), "path": r.path}
            for r in results
        ]
        data["deliveries"] = [
            {"id": d.id, "destination": d.destination, "state": d.state,
             "attempts": d.attempts, "sop_instance_uid": d.sop_instance_uid,
             "last_error": d.last_error, "sent_at": _iso(d.sent_at),
             "next_attempt_at": _iso(d.next_attempt_at)}
            for d in deliveries
        ]
        data["timeline"] = [
            {"at": _iso(e.at), "kind": e.kind, "actor": e.actor, "detail": e.detail,
             "sop_instance_uid": e.sop_instance_uid, "status": e.status}
            for e in events
        ]
    data["jobs"] = [job_detail(state.database, job_id) for job_id in job_ids]
    root = state.settings.storage.path
    for result in data["results"]:
        path = root / result.pop("path")
        try:
            if result["kind"] == "sr":
                result["findings"] = results_view.sr_findings(path)
            elif result["kind"] == "seg":
                result["segments"] = results_view.segment_labels(results_view.read(path))
        except (ViewError, AttributeError, KeyError, IndexError) as exc:
            # A result that cannot be read is shown with the reason, not a failed page.
            result["error"] = str(exc) or type(exc).__name__
    return data


PNG_SIZES = range(64, 4097)


@router.get("/studies/{study_uid}/images/{sop_instance_uid}.png",
            response_class=Response, summary="A received image as PNG (longest side <= size)")
def image(study_uid: str, sop_instance_uid: str, state: State, _: Viewer,
          size: int = 768) -> Response:
    if size not in PNG_SIZES:
        raise HTTPException(422, f"size is {PNG_SIZES.start}..{PNG_SIZES.stop - 1}")
    with state.database.transaction() as session:
        row = session.execute(
            select(Instance.path, Instance.purged_at).join(Study, Study.id == Instance.study_id)
            .where(Study.study_uid == study_uid, Instance.sop_instance_uid == sop_instance_uid)
        ).first()
    if row is None:
        raise HTTPException(404, f"no image {sop_instance_uid} in study {study_uid}")
    if row[1] is not None:
        raise HTTPException(410, f"image {sop_instance_uid} was purged by retention")
    try:
        png = results_view.image_png(state.settings.storage.path / row[0], size)
    except ViewError as exc:
        raise HTTPException(422, str(exc)) from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "private"})


@router.get("/results/{result_id}.png", response_class=Response,
            summary="A SEG as a transparent overlay, or an overlay object, as PNG")
def result_png(result_id: int, state: State, _: Viewer, size: int = 768) -> Response:
    if size not in PNG_SIZES:
        raise HTTPException(422, f"size is {PNG_SIZES.start}..{PNG_SIZES.stop - 1}")
    with state.database.transaction() as session:
        result = session.get(Result, result_id)
        kind, rel = (result.kind, result.path) if result is not None else (None, None)
    if kind is None or rel is None:
        raise HTTPException(404, f"no result {result_id}")
    path = state.settings.storage.path / rel
    try:
        if kind == "seg":
            png = results_view.seg_png(path, size)
        elif kind == "overlay":
            png = results_view.image_png(path, size)
        else:
            raise HTTPException(422, f"result {result_id} is a {kind}, not a picture")
    except ViewError as exc:
        raise HTTPException(422, str(exc)) from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "private"})


@router.post("/deliveries/{delivery_id}/retry", summary="Send a failed delivery again")
def retry_delivery(delivery_id: int, state: State, who: Admin) -> dict[str, Any]:
    try:
        ids = outbox.retry(state.database, [delivery_id])
    except DeliveryNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except DispatchError as exc:
        raise HTTPException(409, str(exc)) from exc
    with state.database.transaction() as session:
        record(session, "delivery-retry", actor=who.name, detail=f"delivery {delivery_id}")
    return {"retried": ids}

"""Studies and what happened to them; operator retry of a failed delivery."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from sqlalchemy import func, select

from dicomnode.assemble import studies as study_list
from dicomnode.assemble.studies import FilterError, StudyFilter
from dicomnode.assemble.studies import dashed as _dashed
from dicomnode.db.audit import record
from dicomnode.db.models import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    Result,
    ResultSet,
    ResultSetState,
    Study,
    StudyState,
)
from dicomnode.dispatch import outbox
from dicomnode.errors import DeliveryNotFoundError, DispatchError
from dicomnode.jobs.queue import job_detail
from dicomnode.results.summary import summarise
from dicomnode.timefmt import iso_utc
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
    return iso_utc(value)


def _study_row(study: Study, instances: int) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid, "patient_id": study.patient_id,
        "calling_ae": study.calling_ae, "state": study.state, "instances": instances,
        "created_at": _iso(study.created_at), "updated_at": _iso(study.updated_at),
        "completed_at": _iso(study.completed_at), "completed_reason": study.completed_reason,
        "needs_reprocess": study.needs_reprocess,
        "study_date": _dashed(study.study_date),
        "station_name": study.station_name,
    }


@router.get("/studies", summary="Studies, newest first; filtered and paged")
def list_studies(
    state: State, _: Viewer, study_state: str | None = None, date_from: str | None = None,
    date_to: str | None = None, patient_id: str | None = None, preset: str | None = None,
    limit: int = 100, offset: int = 0,
) -> dict[str, Any]:
    if study_state is not None and study_state not in STATES:
        raise HTTPException(422, f"unknown state '{study_state}' (one of {', '.join(STATES)})")
    try:
        where = StudyFilter(
            state=study_state or None,
            date_from=StudyFilter.parse_date(date_from, "date_from"),
            date_to=StudyFilter.parse_date(date_to, "date_to"),
            patient_id=patient_id or None, preset=preset or None,
        )
    except FilterError as exc:
        raise HTTPException(422, str(exc)) from exc
    page = study_list.list_studies(state.database, where, limit=limit, offset=offset)
    rows = [row.as_json() for row in page.rows]
    with state.database.transaction() as session:
        # Derived per study: how far the latest job's results got (results.summary).
        summaries = summarise(session, [row["study_uid"] for row in rows],
                              max_attempts=state.settings.results.max_attempts)
        for row in rows:
            summary = summaries.get(row["study_uid"])
            row["delivery"] = None if summary is None else summary.as_json()
        by_state = dict(session.execute(
            select(Study.state, func.count()).group_by(Study.state)).all())
    return {"studies": rows, "total": page.total, "limit": page.limit, "offset": page.offset,
            "states": {s: int(by_state.get(s, 0)) for s in STATES}}


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
        latest_set = session.scalar(
            select(ResultSet.objects_json).where(
                ResultSet.study_uid == study_uid, ResultSet.state == ResultSetState.ENCODED,
                ResultSet.objects_json.is_not(None))
            .order_by(ResultSet.job_id.desc()).limit(1))
        current = _current(results, None if latest_set is None else json.loads(latest_set))
        data["results"] = [
            {"id": r.id, "job_id": r.job_id, "kind": r.kind,
             "sop_instance_uid": r.sop_instance_uid, "source_uid": r.source_uid,
             "created_at": _iso(r.created_at), "path": r.path, "current": r.id in current}
            for r in results
        ]
        kinds = {r.sop_instance_uid: r.kind for r in results}
        jobs_of = {r.sop_instance_uid: r.job_id for r in results}
        objects = _objects(results, instances)
        for result in data["results"]:
            result["object"] = objects[result["sop_instance_uid"]]
        data["deliveries"] = [
            {"id": d.id, "destination": d.destination, "state": d.state,
             "attempts": d.attempts, "sop_instance_uid": d.sop_instance_uid,
             "object": objects.get(d.sop_instance_uid, "result object"),
             "kind": kinds.get(d.sop_instance_uid), "job_id": jobs_of.get(d.sop_instance_uid),
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


def _current(results: Sequence[Result], latest_set: list[str] | None) -> set[int]:
    """The result rows a PACS user should look at: the objects of the latest encoded result
    set (`latest_set`, its SOP Instance UIDs: those it made and those of an earlier job it
    kept), so a SEG the latest run no longer makes (its model switched off, the image now
    ungradable) is not current. Without that record (sets encoded before migration 13): the
    latest SR, and per source image the latest SEG and overlay."""
    if latest_set is not None:
        members = set(latest_set)
        return {r.id for r in results if r.sop_instance_uid in members}
    latest: dict[tuple[str, str | None], Result] = {}
    for r in results:
        key = (r.kind, r.source_uid)
        if key not in latest or r.job_id >= latest[key].job_id:
            latest[key] = r
    return {r.id for r in latest.values()}


def _objects(results: Sequence[Result], instances: Sequence[Instance]) -> dict[str, str]:
    """A name per result object for people: "SR (job 3)", "SEG of image 2 (R)"."""
    number = {i.sop_instance_uid: (n, i.laterality) for n, i in enumerate(instances, 1)}
    names = {}
    for r in results:
        if r.source_uid is None:
            names[r.sop_instance_uid] = f"{r.kind.upper()} (job {r.job_id})"
            continue
        n, side = number.get(r.source_uid, (None, None))
        image = f"image {n}" if n is not None else f"image {r.source_uid}"
        label = "SEG" if r.kind == "seg" else r.kind
        names[r.sop_instance_uid] = f"{label} of {image}" + (f" ({side})" if side else "") + \
            f" (job {r.job_id})"
    return names


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

"""Health: database reachable, execution providers available vs in use, queue depth.

"In use" comes from sessions actually created (`session.get_providers()`), never from the
settings: onnxruntime-gpu lists CUDA as available even where it falls back to CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import onnxruntime as ort
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from dicomnode.db.engine import Database
from dicomnode.db.models import ModelRun
from dicomnode.inference.devices import provider_statuses
from dicomnode.inference.remote import RemoteSession
from dicomnode.inference.sessions import SessionPool
from dicomnode.jobs import queue

logger = logging.getLogger(__name__)


def _last_providers(database: Database) -> dict[str, str | None]:
    """model@version -> the provider its most recent run used."""
    with database.transaction() as session:
        rows = session.execute(
            select(ModelRun.model_id, ModelRun.version, ModelRun.provider)
            .where(ModelRun.provider.is_not(None))
            .order_by(ModelRun.id)
        ).all()
    return {f"{m}@{v}": p for m, v, p in rows}


def last_run(database: Database) -> dict[str, Any] | None:
    """The providers the most recent job's model runs actually used (None: no run yet)."""
    with database.transaction() as session:
        job_id = session.scalar(
            select(ModelRun.job_id).where(ModelRun.provider.is_not(None))
            .order_by(ModelRun.id.desc()).limit(1))
        if job_id is None:
            return None
        rows = session.execute(
            select(ModelRun.provider, ModelRun.finished_at)
            .where(ModelRun.job_id == job_id, ModelRun.provider.is_not(None))).all()
    finished = max((f for _, f in rows if f is not None), default=None)
    return {"job_id": job_id, "providers": sorted({str(p) for p, _ in rows}),
            "finished_at": finished.isoformat() if finished is not None else None}


def execution_report(database: Database | None, *, probe: bool) -> dict[str, Any]:
    """Providers in the package, whether a device answers (with `probe`), what the last run
    used. Three separate facts: "in the package" is not "works here" (module docstring)."""
    report: dict[str, Any] = {
        "providers": [s.to_dict() for s in provider_statuses(probe)],
        "probed": probe,
    }
    if database is not None:
        try:
            run = last_run(database)
        except SQLAlchemyError as exc:
            logger.warning("health: cannot read the last model runs: %s", exc)
            run = None
        report["last_run"] = run
        report["in_use"] = ", ".join(run["providers"]) if run else None
    return report


def health_report(database: Database, sessions: SessionPool | None,
                  *, probe: bool = False) -> dict[str, Any]:
    report: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "providers_in_package": list(ort.get_available_providers()),
        "providers_requested": list(sessions.requested) if sessions else None,
        "sessions": [
            {"model": s.key, "provider": s.provider, "providers": s.providers}
            for s in (sessions.loaded() if sessions else [])
        ],
    }
    if sessions is not None and sessions.remote is not None:
        # Readiness of the server and of every model this node has sent there.
        remote_models = [(s.session.model_id, s.session.version) for s in sessions.loaded()
                         if isinstance(s.session, RemoteSession)]
        report["remote"] = sessions.remote.status(remote_models)
    try:
        with database.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        report["database"] = {"ok": True, "url": database.engine.url.render_as_string(
            hide_password=True)}
        report["queue"] = queue.queue_depth(database)
        report["last_run_providers"] = _last_providers(database)
    except SQLAlchemyError as exc:
        report["database"] = {"ok": False, "error": str(exc).splitlines()[0]}
    report["execution"] = execution_report(
        database if report["database"]["ok"] else None, probe=probe)
    report["ok"] = bool(report["database"]["ok"])
    return report

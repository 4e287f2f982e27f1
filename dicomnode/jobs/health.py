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


def health_report(database: Database, sessions: SessionPool | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "providers_available": list(ort.get_available_providers()),
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
    report["ok"] = bool(report["database"]["ok"])
    return report

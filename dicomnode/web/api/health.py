"""GET /api/health and GET /metrics (Prometheus text format), both read from the database."""

from __future__ import annotations

import logging
import socket
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from dicomnode import __version__
from dicomnode.db.models import Delivery, DeliveryState, Job, ModelRun, Study
from dicomnode.settings import Settings
from dicomnode.web.deps import State, Viewer

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])

# A destination counts as reachable when its port accepts a TCP connection this fast. A full
# C-ECHO per health request would open associations at the PACS on every poll.
CONNECT_TIMEOUT = 1.0


def _reachable(settings: Settings) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, dest in sorted(settings.destinations.items()):
        try:
            with socket.create_connection((dest.host, dest.port), timeout=CONNECT_TIMEOUT):
                out[name] = {"reachable": True, "address": f"{dest.host}:{dest.port}"}
        except OSError as exc:
            out[name] = {"reachable": False, "address": f"{dest.host}:{dest.port}",
                         "error": exc.strerror or str(exc)}
    return out


@router.get("/health", summary="Node, database, providers in use, queue depth, destinations")
def health(state: State, _: Viewer) -> dict[str, Any]:
    settings = state.settings
    report: dict[str, Any] = {
        "node": {"version": __version__, "ae_title": settings.node.ae_title,
                 "port": settings.node.port},
        "models": len(state.catalog.catalog.registry),
        "presets": len(state.catalog.catalog.presets.presets),
    }
    try:
        with state.database.transaction() as session:
            session.execute(text("SELECT 1"))
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            providers = sorted({p for p in session.scalars(
                select(ModelRun.provider).where(ModelRun.provider.is_not(None)).distinct())
                if p})
        report["database"] = {"ok": True}
        report["queue"] = {str(k): int(v) for k, v in jobs.items()}
        report["providers_in_use"] = providers
    except SQLAlchemyError as exc:
        report["database"] = {"ok": False, "error": str(exc).splitlines()[0]}
    if state.health_probe is not None:
        report["processing"] = state.health_probe()
    report["destinations"] = _reachable(settings)
    report["ok"] = bool(report["database"]["ok"])
    return report


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    if labels:
        inner = ",".join(
            f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
            for k, v in sorted(labels.items()))
        return f"{name}{{{inner}}} {value:g}"
    return f"{name} {value:g}"


def render_metrics(state: State) -> str:
    lines: list[str] = []
    with state.database.transaction() as session:
        studies = dict(session.execute(
            select(Study.state, func.count()).group_by(Study.state)).all())
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        runs = session.execute(
            select(ModelRun.model_id, func.count(),
                   func.coalesce(func.sum(ModelRun.duration_ms), 0))
            .where(ModelRun.duration_ms.is_not(None)).group_by(ModelRun.model_id)).all()
        deliveries = dict(session.execute(
            select(Delivery.state, func.count()).group_by(Delivery.state)).all())
    lines += ["# HELP dicomnode_studies_received_total Studies received (any state).",
              "# TYPE dicomnode_studies_received_total counter",
              _line("dicomnode_studies_received_total", sum(studies.values())),
              "# HELP dicomnode_studies Studies by state.",
              "# TYPE dicomnode_studies gauge"]
    lines += [_line("dicomnode_studies", n, {"state": s}) for s, n in sorted(studies.items())]
    lines += ["# HELP dicomnode_jobs Jobs by state.", "# TYPE dicomnode_jobs gauge"]
    lines += [_line("dicomnode_jobs", n, {"state": s}) for s, n in sorted(jobs.items())]
    lines += ["# HELP dicomnode_model_run_seconds Model run durations.",
              "# TYPE dicomnode_model_run_seconds summary"]
    for model, count, total_ms in sorted(runs):
        lines.append(_line("dicomnode_model_run_seconds_sum", float(total_ms or 0) / 1000,
                           {"model": model}))
        lines.append(_line("dicomnode_model_run_seconds_count", count, {"model": model}))
    lines += ["# HELP dicomnode_deliveries Deliveries (outbox rows) by state.",
              "# TYPE dicomnode_deliveries gauge"]
    lines += [_line("dicomnode_deliveries", deliveries.get(s, 0), {"state": s})
              for s in DeliveryState.ALL]
    lines += ["# HELP dicomnode_delivery_failures Deliveries failed after their last attempt.",
              "# TYPE dicomnode_delivery_failures gauge",
              _line("dicomnode_delivery_failures", deliveries.get(DeliveryState.FAILED, 0))]
    return "\n".join(lines) + "\n"


@metrics_router.get("/metrics", response_class=PlainTextResponse,
                    summary="Prometheus metrics (bearer token)")
def metrics(state: State, _: Viewer) -> PlainTextResponse:
    return PlainTextResponse(render_metrics(state),
                             media_type="text/plain; version=0.0.4; charset=utf-8")

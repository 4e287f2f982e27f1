"""GET /api/health and GET /metrics (Prometheus text format), both read from the database.

Destinations are checked with a DICOM C-ECHO (the same as `dicomnode destinations check`), all
at once with a short timeout, and the answers are kept for `web.health_cache_seconds`, so a
monitor polling the health endpoint does not open an association at each PACS every time.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from dicomnode import __version__
from dicomnode.db.models import Delivery, DeliveryState, Job, ModelRun, Study, utcnow
from dicomnode.dispatch.check import check_destination, describe
from dicomnode.jobs.health import execution_report
from dicomnode.settings import DestinationSettings, DicomWebDestinationSettings, Settings
from dicomnode.timefmt import iso_utc
from dicomnode.web.deps import State, Viewer

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])

AnyDestination = DestinationSettings | DicomWebDestinationSettings

# Destinations echoed at once, at most (each echo is one association and a thread).
MAX_PARALLEL_ECHOES = 16


@dataclass(frozen=True)
class DestinationCheck:
    reachable: bool
    detail: str
    checked_at: datetime
    seconds: float
    monotonic: float  # when it was made, for the cache's age

    def to_dict(self, destination: AnyDestination) -> dict[str, Any]:
        report: dict[str, Any] = {
            "reachable": self.reachable, **describe(destination), "detail": self.detail,
            "checked_at": iso_utc(self.checked_at), "seconds": round(self.seconds, 3),
        }
        if self.reachable:
            report["status"] = "success"
        else:
            report["error"] = self.detail
        return report


# What a check depends on: a changed destination or calling AE title is checked afresh.
_Key = tuple[str, str, str]


def _echo(name: str, destination: AnyDestination, calling_ae: str,
          settings: Settings) -> DestinationCheck:
    timeout = settings.web.health_echo_timeout_seconds
    short = settings.dispatch.model_copy(
        update={"connect_timeout_seconds": timeout, "network_timeout_seconds": timeout})
    checked_at, started = utcnow(), time.monotonic()
    try:
        outcome = check_destination(name, destination, calling_ae=calling_ae, settings=short)
    except (OSError, RuntimeError, ValueError) as exc:  # pynetdicom's own refusals
        return DestinationCheck(False, f"C-ECHO failed: {exc}", checked_at,
                                time.monotonic() - started, started)
    return DestinationCheck(outcome.ok, outcome.detail, checked_at, outcome.seconds, started)


class EchoCache:
    """The latest C-ECHO answer per destination, reused while younger than the cache time."""

    def __init__(self) -> None:
        # One round of echoes at a time: concurrent polls wait for it and read its answers.
        self._lock = threading.Lock()
        self._checks: dict[_Key, DestinationCheck] = {}

    def report(self, settings: Settings) -> dict[str, dict[str, Any]]:
        calling = settings.dispatch.calling_ae_title or settings.node.ae_title
        keys = {name: (name, d.model_dump_json(), calling)
                for name, d in settings.destinations.items()}
        max_age = settings.web.health_cache_seconds
        with self._lock:
            now = time.monotonic()
            due = [name for name, key in keys.items()
                   if key not in self._checks or now - self._checks[key].monotonic >= max_age]
            if due:
                with ThreadPoolExecutor(min(len(due), MAX_PARALLEL_ECHOES),
                                        thread_name_prefix="health-echo") as pool:
                    futures = {name: pool.submit(_echo, name, settings.destinations[name],
                                                 calling, settings) for name in due}
                self._checks = {key: check for key, check in self._checks.items()
                                if key in keys.values()}
                for name, future in futures.items():
                    self._checks[keys[name]] = future.result()
            return {name: self._checks[keys[name]].to_dict(settings.destinations[name])
                    for name in sorted(keys)}


@router.get("/health", summary="Node, database, providers in use, queue depth, destinations "
            "(C-ECHO)")
def health(request: Request, state: State, _: Viewer) -> dict[str, Any]:
    settings = state.settings
    report: dict[str, Any] = {
        "node": {"version": __version__, "ae_title": settings.node.ae_title,
                 "port": settings.node.port,
                 "tls_port": settings.node.tls.port if settings.node.tls else None},
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
    # Package providers, whether a device answers (probed once per process), last run's.
    report["execution"] = execution_report(
        state.database if report["database"]["ok"] else None, probe=True)
    if state.health_probe is not None:
        report["processing"] = state.health_probe()
    echoes: EchoCache = request.app.state.destination_echoes
    report["destinations"] = echoes.report(settings)
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

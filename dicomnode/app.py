"""Composition root: wires the database, the receiver, the study assembler, processing (jobs),
the results pipeline (SR, SEG, overlay) and the dispatcher (outbox to the PACS).

`Node(settings).start()` / `.stop()` for embedding and tests; `serve()` runs in the
foreground until SIGINT or SIGTERM and then shuts down cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from dicomnode.assemble.assembler import Assembler, StudyCompleteHook
from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.dispatch import Dispatcher
from dicomnode.dispatch.dimse_tls import check_destinations
from dicomnode.durable import sweep_temporaries
from dicomnode.errors import DicomNodeError
from dicomnode.identity import NodeIdentity, claim_identity
from dicomnode.jobs import ProcessingService
from dicomnode.jobs.completeness_rules import PresetCompletenessRules
from dicomnode.receive.ae import Receiver
from dicomnode.receive.workers import ReceiverPool
from dicomnode.results.pipeline import ResultsPipeline
from dicomnode.retention.service import RetentionService
from dicomnode.routing.catalog import Catalog, CatalogHolder
from dicomnode.routing.watcher import CatalogWatcher
from dicomnode.settings import Settings
from dicomnode.web.server import WebServer, start_web

logger = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Node:
    def __init__(self, settings: Settings, hooks: list[StudyCompleteHook] | None = None) -> None:
        self.settings = settings
        self.database: Database | None = None
        self.assembler: Assembler | None = None
        self.receiver: Receiver | ReceiverPool | None = None
        self.processing: ProcessingService | None = None
        self.results: ResultsPipeline | None = None
        self.dispatcher: Dispatcher | None = None
        self.web: WebServer | None = None
        self.web_error: str | None = None  # why the console/API is not serving, if it failed
        self.catalog: CatalogHolder | None = None
        self.watcher: CatalogWatcher | None = None
        self.retention: RetentionService | None = None
        self.identity: NodeIdentity | None = None
        self._hooks = list(hooks or [])
        self._stopped = threading.Event()

    def start(self) -> tuple[str, int]:
        """Open (and migrate) the database, start timing, start listening."""
        settings = self.settings
        if not settings.callers:
            logger.warning(
                "callers is empty: any calling AE title is accepted; list the cameras "
                "under 'callers' to restrict who may send"
            )
        # Certificates and keys first: a bad file stops the start with the key that names it.
        check_destinations(settings)
        self.database = open_database(settings.database.url)
        # Other nodes' (and the CLI's) committed work wakes this node's stages (PostgreSQL).
        self.database.wakeups.listen()
        # Temporary files a killed predecessor left half-written: in the background, as
        # the storage tree may be large.
        threading.Thread(target=_sweep_temporaries, args=(settings.storage.path,),
                         name="tmp-sweep", daemon=True).start()
        # One catalog holder per node: the console's preset edits and the watcher reload it.
        # Bad models and presets are reported and left out here; they never stop the node.
        self.catalog = holder = CatalogHolder(settings)
        catalog = holder.catalog
        # Who this process is across restarts: its own unfinished jobs and deliveries are
        # taken back at once (no waiting for leases to lapse).
        self.identity = identity = claim_identity(settings.storage.path, "serve")
        resume_as = identity.name if identity.resumable else None
        self.dispatcher = Dispatcher(settings, self.database,
                                     owner=None if resume_as is None else f"{resume_as}:send")
        self.dispatcher.start()
        # Each stage is woken when the row that makes its work commits (dicomnode.db.wakeups)
        # and also polls its table, so a missed wake only delays work by one poll.
        self.results = ResultsPipeline(
            settings, self.database, catalog.registry, catalog.presets,
            on_queued=self.dispatcher.wake, expecting=self.dispatcher.expecting,
            max_attempts=settings.results.max_attempts,
            retry_seconds=settings.results.retry_seconds)
        self.results.start()
        processing = ProcessingService(
            settings, self.database, catalog.registry, catalog.presets,
            on_job_finished=[self.results.wake], node_id=resume_as,
        )
        self.processing = processing
        processing.start()
        holder.subscribe(self._use_catalog)
        hooks = [*self._hooks, processing.on_study_complete]
        # Each study waits for what its preset expects (its `completeness`), else the node's.
        self.assembler = Assembler(
            self.database, settings.completeness, hooks,
            rules=PresetCompletenessRules(settings, self.database, lambda: holder.catalog))
        self.assembler.start()
        # receive.processes > 1: associations are received in worker processes
        # (receive/workers.py), which report to this process's assembler.
        self.receiver = (ReceiverPool(settings, self.assembler)
                         if settings.receive.processes > 1
                         else Receiver(settings, self.database, self.assembler))
        self.assembler.receiving = self.receiver.is_receiving
        host, port = self.receiver.start()
        # Console/API last: preset edits reach the processing service and results pipeline.
        # A console that cannot start (port taken, bad certificate) is reported, and the
        # DICOM service keeps running: cameras must not lose their destination over it.
        try:
            self.web = start_web(settings, self.database, holder, health_probe=self.health,
                                 receive_listener=self.assembler)
        except DicomNodeError as exc:
            self.web_error = str(exc)
            logger.error("web console and API NOT running; the DICOM service is: %s", exc)
        # Changes made on disk (other nodes, an editor, a new model version) reload too.
        self.watcher = CatalogWatcher(holder)
        self.watcher.start()
        self.retention = RetentionService(settings, self.database)
        self.retention.start()
        tls_address = self.receiver.tls_address
        logger.info("dicomnode %s listening on %s:%d%s (storage %s)",
                    settings.node.ae_title, host, port,
                    f", DICOM TLS on port {tls_address[1]}"
                    if tls_address is not None and settings.node.port is not None else
                    " (DICOM TLS)" if tls_address is not None else "",
                    settings.storage.path)
        return host, port

    def health(self) -> dict[str, Any]:
        """Processing health plus whether the console/API is serving."""
        report: dict[str, Any] = (
            self.processing.health() if self.processing is not None else {"ok": False})
        web: dict[str, Any] = (
            {"ok": False, "error": self.web_error} if self.web_error is not None
            else {"ok": True, "enabled": self.web is not None})
        report["web"] = web
        if isinstance(self.receiver, ReceiverPool):
            pool = self.receiver.health()
            report["receive"] = {"ok": pool.ok, "processes": pool.processes,
                                 "running": pool.running, "restarts": pool.restarts,
                                 "errors": pool.errors}
        return report

    def _use_catalog(self, catalog: Catalog) -> None:
        """Hand a reloaded catalog to the stages that route, run and encode."""
        if self.processing is not None:
            self.processing.use_catalog(catalog)
        if self.results is not None:
            self.results.use_catalog(catalog)

    def stop(self) -> None:
        """Stop accepting, let stores in progress finish, stop timing, close the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.retention is not None:
            self.retention.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.web is not None:
            self.web.stop()
        grace = self.settings.node.shutdown_grace_seconds
        if self.receiver is not None:
            self.receiver.stop(grace)
        if self.assembler is not None:
            self.assembler.stop(wait=True)
        # Downstream stages stop in flow order: a job in progress finishes, its results are
        # encoded or left for the next start, then the send in progress completes.
        if self.processing is not None:
            self.processing.stop()
        if self.results is not None:
            self.results.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.database is not None:
            self.database.dispose()
        if self.identity is not None:
            self.identity.release()
        logger.info("dicomnode stopped")


def _sweep_temporaries(root: Path) -> None:
    try:
        removed = sweep_temporaries(root) if root.is_dir() else 0
    except OSError as exc:
        logger.warning("could not sweep temporary files under %s: %s", root, exc)
        return
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted write", removed)


def serve(settings: Settings) -> int:
    """Run in the foreground until SIGINT/SIGTERM; return the exit code."""
    # Block the stop signals before any thread starts, so every thread inherits the mask
    # and only sigwait below sees them (PITFALLS.md: pynetdicom's threads otherwise do).
    # The mask stays in place afterwards: a second signal during shutdown must not kill
    # the process halfway through; the process ends when serve returns.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    node = Node(settings)
    try:
        try:
            node.start()
        except OSError as exc:
            ports = [str(p) for p in (settings.node.port,
                                      settings.node.tls.port if settings.node.tls else None)
                     if p is not None]
            raise DicomNodeError(
                f"cannot listen on {settings.node.host}:{'/'.join(ports)}: "
                f"{exc.strerror or exc}"
            ) from exc
        received = signal.sigwait(_STOP_SIGNALS)
        logger.info("received %s; shutting down", signal.Signals(received).name)
    finally:
        node.stop()
    return 0

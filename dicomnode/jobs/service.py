"""The processing service: plans completed studies into jobs and runs them on worker threads.

Wiring (composition root): `service = ProcessingService(settings, database, registry, presets)`,
pass `service.on_study_complete` to the assembler's hooks, `service.start()` / `service.stop()`;
`on_job_finished` callables get each job id once its end is committed (e.g. wake the encoder).
The hook only speeds things up: each worker also sweeps the database for studies that need a
job (missed notifications, a crash between completion and planning, late instances), so
nothing depends on the notification arriving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from dicomnode.db import audit, wakeups
from dicomnode.db.engine import Database
from dicomnode.db.transient import Retries, is_transient, retrying
from dicomnode.errors import DatabaseError, InferenceUnavailableError, StudyNotFoundError
from dicomnode.inference.executor import GraphExecutor
from dicomnode.inference.sessions import SessionPool
from dicomnode.jobs import queue
from dicomnode.jobs.completeness_rules import preset_rules
from dicomnode.jobs.health import health_report
from dicomnode.jobs.planning import plan_study, study_facts
from dicomnode.jobs.runner import run_job
from dicomnode.redact import safe_error
from dicomnode.registry.registry import Registry
from dicomnode.routing.catalog import Catalog
from dicomnode.routing.loader import PresetSet
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ProcessingService:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        registry: Registry,
        presets: PresetSet,
        *,
        sessions: SessionPool | None = None,
        node_id: str | None = None,
        on_job_finished: Iterable[Callable[[int], None]] = (),
    ) -> None:
        self.settings = settings
        self.database = database
        self.registry = registry
        self.presets = presets
        config = settings.inference
        self.sessions = sessions or SessionPool.for_settings(config)
        self.executor = GraphExecutor(
            registry, self.sessions, max_batch=config.max_batch,
            model_threads=config.model_threads, batch_bytes=config.batch_bytes,
            chunk_bytes=config.chunk_bytes,
        )
        # A given node_id is a stable identity (dicomnode.identity): jobs its workers left
        # running in a previous run are taken back at start.
        self.resume = node_id is not None
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # Called with the job id after a job's end is committed (e.g. wake the encoder).
        self.on_job_finished: list[Callable[[int], None]] = list(on_job_finished)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._plan_lock = threading.Lock()

    def use_catalog(self, catalog: Catalog) -> None:
        """Plan from now on with a reloaded catalog (a CatalogHolder listener).

        Registry first: a new preset may name a model version only the new registry holds.
        Sessions are keyed by model@version, so a new version loads on first use; a running job
        keeps its resolved graph (versions are meant to be added, not edited in place).
        """
        self.executor.registry = catalog.registry
        self.registry = catalog.registry
        self.presets = catalog.presets

    @property
    def storage_root(self) -> Path:
        return self.settings.storage.path

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        # A job or a study to plan committed by anyone (this process, or another node's
        # notification) wakes an idle worker; the poll is the fallback.
        self.database.wakeups.subscribe(wakeups.JOBS, self._wake)
        if self.resume:
            resumed = queue.resume_own(self.database, f"{self.node_id}:")
            if resumed:
                logger.info("taking back %d job(s) this node was running when it stopped",
                            resumed)
        for index in range(self.settings.inference.workers):
            thread = threading.Thread(
                target=self._loop, args=(f"{self.node_id}:w{index}",),
                name=f"job-worker-{index}", daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        logger.info("processing: %d job worker(s), providers %s",
                    len(self._threads), list(self.sessions.requested))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a job in progress finishes (or its lease lapses, another runs it)."""
        self._stop.set()
        self._wake.set()
        self.database.wakeups.unsubscribe(wakeups.JOBS, self._wake)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def health(self) -> dict[str, Any]:
        """Database, providers available vs in use by this process's sessions, queue depth."""
        return health_report(self.database, self.sessions)

    # -- the hook ----------------------------------------------------------------------------

    def on_study_complete(self, study_uid: str) -> None:
        """Assembler hook: plan the study now and wake a worker."""
        try:
            self.plan(study_uid, queue.COMPLETE)
        except Exception as exc:  # the hook must never break the assembler
            logger.warning("study %s: planning failed (the sweep retries): %s", study_uid,
                           safe_error(exc))
        self._wake.set()

    # -- planning and running ------------------------------------------------------------------

    def plan(self, study_uid: str, reason: str) -> int | None:
        """Route and resolve a study and queue its job; None when not routed or already done.

        Whatever goes wrong reading, routing or resolving this one study fails this study (a
        failed job row says why) and nothing else: the next study is planned as usual. Only
        database errors propagate (the sweep tries again).
        """
        try:
            facts = study_facts(self.database, self.storage_root, study_uid)
            plan = plan_study(study_uid, facts, self.registry, self.presets,
                              self.settings.modality_defaults)
        except (DBAPIError, DatabaseError, StudyNotFoundError):
            raise
        except Exception as exc:
            logger.error("study %s: planning failed: %s", study_uid, safe_error(exc),
                         exc_info=True)
            return queue.fail_unplannable(self.database, study_uid, reason, safe_error(exc))
        return queue.enqueue(self.database, plan, reason)

    def plan_pending(self) -> list[int]:
        """Queue jobs for every study that needs one; return the new job ids."""
        created = []
        # One planner per process at a time; across nodes `enqueue` decides.
        with self._plan_lock:
            for study_uid, reason in queue.studies_to_plan(
                    self.database, late_quiet_seconds=self._late_quiet_seconds):
                try:
                    job_id = self.plan(study_uid, reason)
                except Exception as exc:  # e.g. the database: this study waits, others go on
                    logger.warning("study %s: planning failed (tried again at the next "
                                   "sweep): %s", study_uid, safe_error(exc))
                    continue
                if job_id is not None:
                    created.append(job_id)
        return created

    def _late_quiet_seconds(self, preset_id: str | None) -> float:
        """How long late images of a study must stop coming before its re-run: the quiet
        period of the preset its latest job ran (as for its first images), else the node's."""
        node = self.settings.completeness
        preset = None if preset_id is None else self.presets.presets.get(preset_id)
        return (node if preset is None else preset_rules(node, preset)).quiet_seconds

    def run_once(self, worker: str | None = None) -> int | None:
        """Claim and run one job; return its id, or None when the queue is empty."""
        worker = worker or f"{self.node_id}:once"
        config = self.settings.inference
        job = queue.claim(self.database, worker, config.lease_seconds,
                          max_attempts=config.max_job_attempts)
        if job is None:
            return None
        logger.info("job %d (study %s, attempt %d) claimed by %s",
                    job.id, job.study_uid, job.attempt, worker)
        heartbeat = _Heartbeat(self.database, job, config.lease_seconds)
        heartbeat.start()
        retries = Retries()
        db = self.settings.database

        def again(operation: Callable[[], T], what: str) -> T:
            return retrying(operation, what=f"job {job.id}: {what}",
                            attempts=db.transient_retries, first_delay=db.retry_seconds,
                            retries=retries)

        try:
            try:
                result, outcome, output = again(lambda: run_job(
                    job, self.database, self.storage_root, config.jobs_folder, self.executor
                ), "run")
            except InferenceUnavailableError as exc:
                # The inference server, not the study: back to the queue, nothing recorded.
                remote = config.remote
                delay = remote.retry_max_delay_seconds if remote else config.poll_seconds
                logger.warning("job %d: %s; queued again in %.0f s", job.id, exc, delay)
                queue.requeue(self.database, job, str(exc), delay)
                return job.id
            except Exception as exc:  # an unexpected error must end the job, not the worker
                if is_transient(exc):
                    # The database stayed away through every retry: that is not the job's
                    # fault. Hand it back (or let its lease lapse) rather than fail it.
                    logger.error("job %d: database unavailable; the job is queued again: %s",
                                 job.id, safe_error(exc))
                    with contextlib.suppress(Exception):
                        queue.release(self.database, job)
                    return job.id
                logger.exception("job %d failed", job.id)
                result, outcome, output = None, {
                    "outcome": "failed", "problems": {"(job)": safe_error(exc)},
                }, None
        finally:
            heartbeat.stop()
        finished = again(lambda: queue.finish(self.database, job, result, outcome, output),
                         "recording the outcome")
        if retries.errors:
            _audit_retries(self.database, job, retries)
        if finished:
            for hook in list(self.on_job_finished):
                try:
                    hook(job.id)
                except Exception:  # a notification; the jobs table is the durable record
                    logger.exception("on-job-finished hook %r failed", hook)
        return job.id

    def _loop(self, worker: str) -> None:
        poll = self.settings.inference.poll_seconds
        while not self._stop.is_set():
            try:
                self.plan_pending()
                ran = self.run_once(worker)
            except Exception:  # e.g. the database is briefly unreachable: retry next poll
                logger.exception("job worker %s: error; retrying", worker)
                ran = None
            if ran is None:
                self._wake.wait(poll)
                self._wake.clear()


def _audit_retries(database: Database, job: queue.ClaimedJob, retries: Retries) -> None:
    try:
        with database.transaction() as session:
            audit.record(session, "database-retry", actor=job.worker, study_uid=job.study_uid,
                         detail=f"job {job.id}: {len(retries.errors)} transient database "
                                f"error(s) retried; last: {retries.errors[-1]}"[:4000])
    except Exception:  # auditing must not undo a finished job
        logger.exception("job %d: could not audit its database retries", job.id)


class _Heartbeat:
    """Renews a job's lease while it runs, so only a dead worker's lease lapses."""

    def __init__(self, database: Database, job: queue.ClaimedJob, lease_seconds: float) -> None:
        self.database = database
        self.job = job
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                if not queue.renew(self.database, self.job.id, self.job.worker, self.lease_seconds):
                    logger.warning("job %d: lease lost", self.job.id)
                    return
            except Exception:
                logger.exception("job %d: lease renewal failed", self.job.id)

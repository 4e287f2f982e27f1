"""The results pipeline: a finished job's stored outputs -> SR, SEG, overlay files -> outbox.

A job that ended `done` or `partial` is encoded once: the objects are written under
`<storage>/results/<job id>/` (staged, fsync'd, renamed into place), and in one transaction a
`result_sets` row (encoded), one `results` row per object, and one outbox row per (object,
destination of the preset) are committed with an audit row. The work list is the database
(finished jobs without an encoded result set), so a crash at any point loses nothing and a job
is never encoded into the outbox twice; a notification (`wake`) only makes it sooner.

Several jobs are encoded at once (`results.encoders` threads), each on its own: a job is
encoded by one thread at a time, and the jobs of one study one after another in job order
(a re-run's objects reuse and reference its predecessor's). The loop is woken when a job's
end is committed (dicomnode.db.wakeups) and when an encoder frees up; it also polls.

An encoding failure never stops the node: the result set is recorded `failed` with the reason
and an audit row, and tried again after `results.retry_seconds`, at most
`results.max_attempts` times; after that an operator's retry (`dicomnode results retry`, the
API or the console; all bookkeeping.retry) queues it again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.db import audit, wakeups
from dicomnode.db.engine import Database
from dicomnode.db.models import (
    Instance,
    Job,
    Result,
    ResultSet,
    ResultSetState,
    utcnow,
)
from dicomnode.dispatch import outbox
from dicomnode.durable import fsync_path
from dicomnode.errors import DicomNodeError
from dicomnode.inference.outputs import read_index
from dicomnode.redact import safe_error
from dicomnode.registry.registry import Registry
from dicomnode.results.bookkeeping import ENCODABLE, work_list
from dicomnode.results.encode import (
    OVERLAY,
    SEG,
    SR,
    EncodedObject,
    encode_images,
    encode_report,
)
from dicomnode.results.job_outputs import JobResults, results_from_outputs
from dicomnode.results.sr import NodeIdentity
from dicomnode.results.uids import COMPREHENSIVE_SR_STORAGE
from dicomnode.routing.catalog import Catalog
from dicomnode.routing.loader import PresetSet
from dicomnode.routing.preset import OutputOptions
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

RESULTS_FOLDER = "results"


class EncodingError(DicomNodeError):
    """A finished job's outputs cannot be encoded (the message names the job and why)."""


@dataclass(frozen=True)
class EncodeOutcome:
    job_id: int
    state: str  # encoded | failed | already (someone encoded it before)
    objects: int = 0
    deliveries: int = 0
    error: str | None = None
    reused: int = 0  # unchanged objects of an earlier job kept (not made or sent again)


@dataclass(frozen=True)
class _JobInfo:
    id: int
    study_uid: str
    preset: str | None
    output_path: str
    created_at: str


@dataclass(frozen=True)
class _Inputs:
    """What a job's objects are made from."""

    sources: list[Dataset]
    results: JobResults
    seed: str  # the job's UIDs derive from it
    load: Callable[[str, str], Dataset | None]  # an object on record, by kind and UID
    fresh: Callable[[str], bool]  # False: the UID is on record but its file cannot be read
    predecessor: Dataset | None


class ResultsPipeline:
    """Encodes finished jobs and queues the objects for the preset's destinations."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        registry: Registry,
        presets: PresetSet,
        *,
        on_queued: Callable[[], None] | None = None,
        expecting: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
        poll_seconds: float | None = None,
        max_attempts: int | None = None,
        retry_seconds: float | None = None,
        encoders: int | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.registry = registry
        self.presets = presets
        self.node = NodeIdentity.for_node(settings.node.ae_title)
        # Called after a commit that queued deliveries (the dispatcher's wake).
        self.on_queued = on_queued
        # Held while a job's first objects are queued and its report is still being built
        # (the dispatcher's `expecting`: it keeps its association open for the rest).
        self.expecting = expecting
        self.poll_seconds = poll_seconds or settings.inference.poll_seconds
        # Unset: the `results` settings (tests pass retry_seconds=0 to retry at once).
        self.max_attempts = (settings.results.max_attempts if max_attempts is None
                             else max_attempts)
        self.retry_seconds = (settings.results.retry_seconds if retry_seconds is None
                              else retry_seconds)
        self.encoders = settings.results.encoders if encoders is None else encoders
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        # Jobs being encoded now (job id -> study), guarded by _lock.
        self._lock = threading.Lock()
        self._in_flight: dict[int, str] = {}
        self._running: set[futures.Future[EncodeOutcome]] = set()

    def use_catalog(self, catalog: Catalog) -> None:
        """Encode from now on with a reloaded catalog (a CatalogHolder listener)."""
        self.registry = catalog.registry
        self.presets = catalog.presets

    @property
    def storage_root(self) -> Path:
        return self.settings.storage.path

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._pool = futures.ThreadPoolExecutor(self.encoders, thread_name_prefix="encode")
        self.database.wakeups.subscribe(wakeups.RESULTS, self._wake)
        self._thread = threading.Thread(target=self._loop, name="dicomnode-results",
                                        daemon=True)
        self._thread.start()
        logger.info("results pipeline started (%d encoder(s))", self.encoders)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the jobs being encoded (a half-encoded job is simply encoded again)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        self.database.wakeups.unsubscribe(wakeups.RESULTS, self._wake)
        thread.join(timeout)
        with self._lock:
            running = set(self._running)
        futures.wait(running, timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self._thread = None
        logger.info("results pipeline stopped")

    def wake(self, _job_id: int | None = None) -> None:
        """A job may have finished: look now rather than at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._hand_out()
            except Exception:  # e.g. the database is briefly unreachable: the work waits
                logger.exception("results pass failed; trying again in %.1f s",
                                 self.poll_seconds)
            self._wake.wait(self.poll_seconds)

    def _hand_out(self) -> None:
        """Give free encoders the oldest pending jobs, at most one job per study at a time.

        Only as many as there are free encoders are taken: the rest stay on the work list (the
        database), so a stop never leaves a backlog queued in memory.
        """
        pool = self._pool
        if pool is None:
            return
        with self._lock:
            free = self.encoders - len(self._in_flight)
            busy_studies = set(self._in_flight.values())
        if free <= 0:
            return  # an encoder finishing wakes the loop
        for job_id, study_uid in self._pending_with_study():
            if free <= 0 or self._stop.is_set():
                return
            if study_uid in busy_studies:
                continue  # an earlier job of this study first (in flight or just handed out)
            busy_studies.add(study_uid)
            with self._lock:
                if job_id in self._in_flight:
                    continue
                self._in_flight[job_id] = study_uid
                future = pool.submit(self.encode_job, job_id)
                self._running.add(future)
            future.add_done_callback(functools.partial(self._done, job_id))
            free -= 1

    def _done(self, job_id: int, future: futures.Future[EncodeOutcome]) -> None:
        with self._lock:
            self._in_flight.pop(job_id, None)
            self._running.discard(future)
        self._wake.set()  # an encoder is free, and the study's next job may be waiting

    def _pending_with_study(self) -> list[tuple[int, str]]:
        """The work list (oldest first) with each job's study."""
        with self.database.transaction() as session:
            ids = work_list(session, max_attempts=self.max_attempts,
                            retry_seconds=self.retry_seconds)
            if not ids:
                return []
            studies = dict(session.execute(
                select(Job.id, Job.study_uid).where(Job.id.in_(ids))).all())
        return [(job_id, str(studies[job_id])) for job_id in ids if job_id in studies]

    # -- work --------------------------------------------------------------------------------

    def pending_jobs(self) -> list[int]:
        """Finished jobs with outputs and no encoded result set (failed ones once due)."""
        with self.database.transaction() as session:
            return work_list(session, max_attempts=self.max_attempts,
                             retry_seconds=self.retry_seconds)

    def run_once(self) -> list[EncodeOutcome]:
        return [self.encode_job(job_id) for job_id in self.pending_jobs()
                if not self._stop.is_set()]

    def encode_job(self, job_id: int) -> EncodeOutcome:
        """Encode one finished job; never raises for a bad job (the failure is recorded).

        In two steps, so that the PACS receives the large objects while the report is built:
        the per-image objects (SEGs, overlays) are written, recorded and queued in a first
        transaction, which wakes the dispatcher; then the SR (it references the SEGs) is
        built, written, and recorded and queued with the result set (`encoded`) in a second.
        A job that fails or dies between the two keeps its first objects (recorded, maybe
        sent) and its next attempt uses them, as it uses an earlier job's unchanged ones.
        """
        started = utcnow()
        try:
            info = self._job(job_id)
            if self._already_encoded(job_id):
                return EncodeOutcome(job_id, "already")
            outputs, destinations = self._preset_options(info)
            with self._expecting():
                objects, queued = self._encode(info, outputs, destinations, started)
        except Exception as exc:  # any encoder or file error: record it, keep the node up
            logger.exception("job %d: encoding results failed", job_id)
            error = safe_error(exc)
            self._record_failure(job_id, error, started)
            return EncodeOutcome(job_id, ResultSetState.FAILED, error=error)
        if queued is None:
            return EncodeOutcome(job_id, "already")
        if queued and self.on_queued is not None:
            self.on_queued()
        made = [o for o in objects if not o.reused]
        logger.info("job %d: %d result object(s) encoded (%d unchanged kept), %d deliveries "
                    "queued", job_id, len(made), len(objects) - len(made), queued)
        return EncodeOutcome(job_id, ResultSetState.ENCODED, len(made), queued,
                             reused=len(objects) - len(made))

    @contextlib.contextmanager
    def _expecting(self) -> Iterator[None]:
        if self.expecting is None:
            yield
            return
        with self.expecting():
            yield

    # -- steps -------------------------------------------------------------------------------

    def _job(self, job_id: int) -> _JobInfo:
        with self.database.transaction() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise EncodingError(f"no job {job_id}")
            if job.state not in ENCODABLE or job.output_path is None:
                raise EncodingError(f"job {job_id} is {job.state} with no outputs to encode")
            return _JobInfo(job.id, job.study_uid, job.preset, job.output_path,
                            job.created_at.isoformat())

    def _already_encoded(self, job_id: int) -> bool:
        with self.database.transaction() as session:
            state = session.scalar(select(ResultSet.state).where(ResultSet.job_id == job_id))
        return state == ResultSetState.ENCODED

    def _preset_options(self, info: _JobInfo) -> tuple[OutputOptions, list[str]]:
        if info.preset is None:
            return OutputOptions(), []
        preset = self.presets.presets.get(info.preset)
        if preset is None:
            # Without the preset the destinations are unknown; failing visibly beats
            # silently keeping results from the PACS.
            raise EncodingError(f"job {info.id}: preset '{info.preset}' is no longer loaded")
        return preset.outputs, list(preset.destinations)

    def _encode(
        self, info: _JobInfo, outputs: OutputOptions, destinations: list[str],
        started: datetime,
    ) -> tuple[list[EncodedObject], int | None]:
        """Both steps (encode_job); returns the objects and the deliveries queued (None:
        someone else encoded the job first).

        The first step goes object by object, each written, recorded and queued by a writer
        thread as soon as it is built, while this thread builds the next one and then the
        report (CPU): the disk, the database and the PACS work meanwhile.
        """
        inputs = self._inputs(info)
        folder = self._attempt_folder(info.id)
        images: list[EncodedObject] = []
        parts: list[futures.Future[tuple[list[Path], int, bool]]] = []
        recorded = False
        try:
            with futures.ThreadPoolExecutor(1, thread_name_prefix="encode-write") as writer:
                try:
                    for obj in encode_images(inputs.sources, inputs.results, outputs,
                                             seed=inputs.seed, earlier=inputs.load,
                                             fresh=inputs.fresh):
                        images.append(obj)
                        parts.append(writer.submit(self._write_and_queue, info, [obj],
                                                   folder, destinations))
                    report = self._report(inputs, outputs, images)
                finally:
                    first_paths, first_queued, recorded, error = self._wait_parts(parts)
            if error is not None:
                raise error
            last = [report] if report is not None else []
            last_paths = self._write(folder, last)
            objects = [*images, *last]
            queued = self._commit(info, objects, [*first_paths, *last_paths], folder,
                                  destinations, started, recorded=len(images))
        except BaseException:
            # Files a part recorded stay (rows point at them, deliveries may be under way);
            # otherwise the attempt leaves nothing behind.
            self._tidy(info.id, folder, keep=recorded)
            raise
        self._tidy(info.id, folder, keep=True)
        return objects, None if queued is None else first_queued + queued

    @staticmethod
    def _wait_parts(parts: list[futures.Future[tuple[list[Path], int, bool]]]
                    ) -> tuple[list[Path], int, bool, BaseException | None]:
        """Every part's outcome, once all have ended: the paths in order, the deliveries
        queued, whether any rows were recorded, and the first part's error."""
        paths: list[Path] = []
        queued, recorded = 0, False
        error: BaseException | None = None
        for future in parts:
            try:
                part_paths, part_queued, part_recorded = future.result()
            except BaseException as exc:  # raised by the caller, after every part ended
                error = error or exc
                continue
            paths += part_paths
            queued += part_queued
            recorded |= part_recorded
        return paths, queued, recorded, error

    def _inputs(self, info: _JobInfo) -> _Inputs:
        folder = self.storage_root / info.output_path
        index = read_index(folder)
        uids = [str(u) for u in index.get("images", [])]
        sources = self._sources(info, uids)
        results = results_from_outputs(folder, self.registry)
        earlier, on_record = self._earlier_objects(info)

        def load(kind: str, uid: str) -> Dataset | None:
            found = earlier.get(uid)
            if found is None or found[0] != kind:
                return None
            try:
                return dcmread(self.storage_root / found[1])
            except (OSError, InvalidDicomError) as exc:  # gone (e.g. removed by hand)
                logger.warning("job %d: earlier %s %s unreadable, making a new one: %s",
                               info.id, kind, uid, exc)
                return None

        return _Inputs(sources, results,
                            seed=f"{info.study_uid}|job {info.id}|{info.created_at}",
                            load=load, fresh=lambda uid: uid not in on_record,
                            predecessor=self._predecessor(info))

    def _build(self, info: _JobInfo, outputs: OutputOptions) -> list[EncodedObject]:
        """All of a job's objects in memory, in one go (profiling, tests): SEGs, overlays, SR."""
        inputs = self._inputs(info)
        images = list(encode_images(inputs.sources, inputs.results, outputs, seed=inputs.seed,
                                    earlier=inputs.load, fresh=inputs.fresh))
        report = self._report(inputs, outputs, images)
        return [*images, *([report] if report is not None else [])]

    def _report(self, inputs: _Inputs, outputs: OutputOptions,
                images: list[EncodedObject]) -> EncodedObject | None:
        """The study's SR over this job's SEGs (made or reused), if the preset asks."""
        return encode_report(inputs.sources, inputs.results, outputs,
                             [o for o in images if o.kind == SEG], node=self.node,
                             seed=inputs.seed, predecessor=inputs.predecessor)

    def _earlier_objects(self, info: _JobInfo) -> tuple[dict[str, tuple[str, str]], set[str]]:
        """SEGs and overlays on record for the study (uid -> kind, path): an earlier job's,
        or this job's from an attempt that stopped after its first step; and every result UID
        on record: a re-run or a retry reuses an unchanged object rather than sending a copy."""
        with self.database.transaction() as session:
            rows = session.execute(
                select(Result.sop_instance_uid, Result.kind, Result.path)
                .where(Result.study_uid == info.study_uid)
            ).all()
        earlier = {str(uid): (str(kind), str(path)) for uid, kind, path in rows
                   if kind in (SEG, OVERLAY)}
        return earlier, {str(row[0]) for row in rows}

    def _sources(self, info: _JobInfo, uids: list[str]) -> list[Dataset]:
        with self.database.transaction() as session:
            paths = dict(session.execute(
                select(Instance.sop_instance_uid, Instance.path)
                .where(Instance.sop_instance_uid.in_(uids))
            ).all())
        missing = [u for u in uids if u not in paths]
        if missing or not uids:
            raise EncodingError(f"job {info.id}: source images not on record: "
                                f"{missing or 'none listed'}")
        return [dcmread(self.storage_root / paths[u]) for u in uids]

    def _predecessor(self, info: _JobInfo) -> Dataset | None:
        """The SR of the latest earlier job of the study, as the reference needs it (from the
        row, so a previous file removed by retention does not block the new report)."""
        with self.database.transaction() as session:
            row = session.execute(
                select(Result.sop_instance_uid, Result.series_instance_uid)
                .where(Result.study_uid == info.study_uid, Result.kind == SR,
                       Result.job_id < info.id)
                .order_by(Result.job_id.desc()).limit(1)
            ).first()
        if row is None:
            return None
        previous = Dataset()
        previous.StudyInstanceUID = info.study_uid
        previous.SeriesInstanceUID = row.series_instance_uid
        previous.SOPInstanceUID = row.sop_instance_uid
        previous.SOPClassUID = COMPREHENSIVE_SR_STORAGE
        return previous

    def _attempt_folder(self, job_id: int) -> Path:
        """A folder of this attempt: `results/<job id>/<token>/`.

        Nothing refers to the folder until a commit records files in it, so an attempt that
        dies before leaves only an unreferenced folder (removed by the next successful
        attempt), and two nodes racing on one job never overwrite each other's files.
        """
        folder = self.storage_root / RESULTS_FOLDER / str(job_id) / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        fsync_path(folder.parent)
        return folder

    def _write(self, folder: Path, objects: list[EncodedObject]) -> list[Path]:
        """Write the objects (each fsync'd, then the folder) and return their paths; an
        object reused from an earlier job or attempt keeps its own path (not written)."""
        paths = [folder / f"{o.kind}-{o.sop_instance_uid}.dcm" for o in objects]
        written = []
        for obj, path in zip(objects, paths, strict=True):
            if not obj.reused:
                obj.dataset.save_as(path, enforce_file_format=True)
                written.append(path)
        for path in written:
            fsync_path(path)
        if written:
            fsync_path(folder)
        return paths

    def _write_and_queue(
        self, info: _JobInfo, objects: list[EncodedObject], folder: Path,
        destinations: list[str],
    ) -> tuple[list[Path], int, bool]:
        """A part of the first step: per-image objects written, recorded and queued (no result set
        yet: the job is still `waiting` for its report), and the dispatcher woken."""
        paths = self._write(folder, objects)
        if all(o.reused for o in objects):
            return paths, 0, False
        with self.database.transaction() as session:
            queued = self._record(session, info, objects, paths, destinations, utcnow())
        if queued and self.on_queued is not None:
            self.on_queued()
        return paths, queued, True

    def _record(
        self, session: Session, info: _JobInfo, objects: list[EncodedObject],
        paths: list[Path], destinations: list[str], now: datetime,
    ) -> int:
        """Result rows and outbox rows for the objects made by this attempt; returns how
        many deliveries were queued."""
        queued = 0
        for obj, path in zip(objects, paths, strict=True):
            if obj.reused:
                continue
            session.add(Result(
                job_id=info.id, study_uid=info.study_uid, kind=obj.kind,
                sop_instance_uid=obj.sop_instance_uid,
                sop_class_uid=str(obj.dataset.SOPClassUID),
                series_instance_uid=str(obj.dataset.SeriesInstanceUID),
                source_uid=obj.source_uid,
                path=path.relative_to(self.storage_root).as_posix(), created_at=now,
            ))
            if destinations:
                queued += len(outbox.enqueue(
                    session, path, destinations,
                    known_destinations=self.settings.destinations.keys(), now=now))
        return queued

    def _tidy(self, job_id: int, folder: Path, *, keep: bool) -> None:
        """After an attempt: drop this attempt's folder (keep=False), or (keep=True) the
        other attempts' folders that hold no file on record."""
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
            return
        with self.database.transaction() as session:
            recorded = {(self.storage_root / p).parent for p in session.scalars(
                select(Result.path).where(Result.job_id == job_id))}
        for other in folder.parent.iterdir():
            if other != folder and other not in recorded:
                shutil.rmtree(other, ignore_errors=True)

    def _commit(
        self, info: _JobInfo, objects: list[EncodedObject], paths: list[Path], folder: Path,
        destinations: list[str], started: datetime, *, recorded: int = 0,
    ) -> int | None:
        """Record the objects after the first `recorded` (those are on record already) and
        queue them, with the result set `encoded`, in one transaction; None if already
        encoded."""
        relative_folder = folder.relative_to(self.storage_root).as_posix()
        with self.database.transaction() as session:
            result_set = session.scalar(select(ResultSet).where(ResultSet.job_id == info.id))
            if result_set is not None and result_set.state == ResultSetState.ENCODED:
                return None  # another worker or node finished it first
            if result_set is None:
                result_set = ResultSet(job_id=info.id, study_uid=info.study_uid, attempts=0)
                session.add(result_set)
            now = utcnow()
            result_set.state = ResultSetState.ENCODED
            result_set.attempts = (result_set.attempts or 0) + 1
            result_set.error = None
            result_set.folder = relative_folder
            result_set.started_at = started
            result_set.finished_at = now
            result_set.objects_json = json.dumps([o.sop_instance_uid for o in objects])
            queued = self._record(session, info, objects[recorded:], paths[recorded:],
                                  destinations, now)
            kinds = ", ".join(f"{sum(o.kind == k and not o.reused for o in objects)} {k}"
                              for k in ("seg", "sr", "overlay"))
            reused = sum(o.reused for o in objects)
            if reused:
                kinds += (f" ({reused} unchanged object(s) of an earlier job or attempt kept, "
                          "not sent again)")
            audit.record(session, "results-encoded", actor="results", study_uid=info.study_uid,
                         detail=f"job {info.id}: {kinds}; queued for "
                                f"{', '.join(destinations) or 'no destination'}")
        return queued

    def _record_failure(self, job_id: int, error: str, started: datetime) -> None:
        try:
            with self.database.transaction() as session:
                job = session.get(Job, job_id)
                study_uid = job.study_uid if job is not None else ""
                result_set = session.scalar(
                    select(ResultSet).where(ResultSet.job_id == job_id))
                if result_set is None:
                    if job is None:
                        return
                    result_set = ResultSet(job_id=job_id, study_uid=study_uid, attempts=0)
                    session.add(result_set)
                elif result_set.state == ResultSetState.ENCODED:
                    return
                result_set.state = ResultSetState.FAILED
                result_set.attempts = (result_set.attempts or 0) + 1
                result_set.error = error[:4000]
                result_set.started_at = started
                result_set.finished_at = utcnow()
                audit.record(session, "results-failed", actor="results", study_uid=study_uid,
                             detail=f"job {job_id} (attempt {result_set.attempts} of "
                                    f"{self.max_attempts}): {error}"[:4000])
        except Exception:  # the database itself is failing: the next pass tries again
            logger.exception("job %d: cannot record the encoding failure", job_id)

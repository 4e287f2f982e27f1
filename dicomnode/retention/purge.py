"""Carry out the retention plan: mark the rows, then delete the files, then note it finished.

Order, so that a node killed at any point leaves no row pointing at a missing file:
1. one transaction marks the study (`purged_at`, only if it is still unpurged and in the state
   the plan saw) and its instance rows (`purged_at`), and writes the audit row;
2. the files of exactly those rows are deleted (never a whole folder: an instance arriving
   meanwhile lands beside them with its own unmarked row), then empty folders and the jobs'
   output folders;
3. `purge_finished_at` is set. A study marked but not finished (the node died in 2) is
   finished by the next run: deleting is idempotent.
The other order (delete, then mark) would leave rows pointing at deleted files after a crash.
Result objects go the same way with `results_purged_at` / `results_purge_finished_at`.
Rows stay: the study, its instances (UIDs, sizes, when received), jobs, results and
deliveries still show that it existed and what was sent.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update

from dicomnode.db import audit
from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Job, Result, ResultSet, Study, utcnow
from dicomnode.receive.storage import free_mb
from dicomnode.retention import policy
from dicomnode.retention.policy import RECEIVED, Candidate
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


class _Nothing(Exception):
    """Nothing to purge after all: roll the marking transaction back."""


@dataclass(frozen=True)
class Report:
    purged: list[Candidate]
    finished_earlier: int  # interrupted purges completed by this run
    free_mb_before: float | None


class Purger:
    def __init__(self, settings: Settings, database: Database, *,
                 clock: Callable[[], datetime] = utcnow,
                 free_space: Callable[[Path], float] = free_mb,
                 actor: str = "retention") -> None:
        self.settings = settings
        self.database = database
        self.root = settings.storage.path
        self.clock = clock
        self.free_space = free_space
        self.actor = actor

    def plan(self) -> list[Candidate]:
        """What a run would purge now (`dicomnode purge --dry-run`); the space freed under
        disk pressure is estimated from the rows' sizes."""
        by_age, spare = self._candidates()
        minimum = self.settings.retention.min_free_mb
        if not minimum:
            return by_age
        chosen = {c.study_uid for c in by_age if c.kind == RECEIVED}
        free = self._free() + sum(c.bytes for c in by_age if c.kind == RECEIVED) / _MB
        for candidate in spare:
            if free >= minimum:
                break
            if candidate.study_uid not in chosen:
                by_age.append(candidate)
                free += candidate.bytes / _MB
        return by_age

    def run(self) -> Report:
        finished = self._finish_interrupted()
        minimum = self.settings.retention.min_free_mb
        before = self._free() if minimum else None
        by_age, spare = self._candidates()
        done = [candidate for candidate in by_age if self._purge(candidate)]
        if minimum:
            # Disk pressure: the oldest finished studies go until the space is free again.
            chosen = {c.study_uid for c in by_age if c.kind == RECEIVED}
            for candidate in spare:
                if self._free() >= minimum:
                    break
                if candidate.study_uid not in chosen and self._purge(candidate):
                    done.append(candidate)
        if done or finished:
            logger.info("retention: %d purge(s), %d interrupted purge(s) finished",
                        len(done), finished)
        return Report(done, finished, before)

    def _free(self) -> float:
        return self.free_space(self.root)

    def _candidates(self) -> tuple[list[Candidate], list[Candidate]]:
        with self.database.transaction() as session:
            return policy.plan(session, self.settings.retention, self.clock(),
                               max_attempts=self.settings.results.max_attempts)

    # -- purging ----------------------------------------------------------------------------

    def _purge(self, candidate: Candidate) -> bool:
        if candidate.kind == RECEIVED:
            paths, folders = self._mark_received(candidate)
        else:
            paths, folders = self._mark_results(candidate)
        if paths is None:
            return False  # changed since the plan, or another node purged it first
        self._delete(paths, folders)
        self._finish(candidate.study_uid, candidate.kind)
        return True

    def _mark_received(self, c: Candidate) -> tuple[list[str] | None, list[str]]:
        now = self.clock()
        try:
            with self.database.transaction() as session:
                # Guard: the study is still as the plan saw it (no late instances since).
                claimed = session.execute(
                    update(Study).where(Study.study_uid == c.study_uid,
                                        Study.state == c.state,
                                        Study.needs_reprocess.is_(False))
                    .values(purged_at=now, purge_finished_at=None),
                    execution_options={"synchronize_session": False})
                if not getattr(claimed, "rowcount", 0):
                    raise _Nothing
                study_id = session.scalar(select(Study.id).where(Study.study_uid == c.study_uid))
                # RETURNING: exactly the rows this transaction marked (another node that got
                # there first leaves none).
                paths = list(session.scalars(
                    update(Instance).where(Instance.study_id == study_id,
                                           Instance.purged_at.is_(None))
                    .values(purged_at=now).returning(Instance.path),
                    execution_options={"synchronize_session": False}))
                if not paths:
                    raise _Nothing
                folders = [p for p in session.scalars(select(Job.output_path).where(
                    Job.study_uid == c.study_uid, Job.output_path.is_not(None))) if p]
                audit.record(session, "purged", actor=self.actor, study_uid=c.study_uid,
                             detail=f"received files: {len(paths)} ({c.bytes / _MB:.1f} MB) "
                                    f"and {len(folders)} job output folder(s); reason "
                                    f"{c.reason}; state {c.state}")
        except _Nothing:
            return None, []
        logger.info("retention: purging %d received file(s) of a %s study (%s)",
                    len(paths), c.state, c.reason)
        return paths, folders

    def _mark_results(self, c: Candidate) -> tuple[list[str] | None, list[str]]:
        now = self.clock()
        try:
            with self.database.transaction() as session:
                claimed = session.execute(
                    update(Study).where(Study.study_uid == c.study_uid, Study.state == c.state)
                    .values(results_purged_at=now, results_purge_finished_at=None),
                    execution_options={"synchronize_session": False})
                if not getattr(claimed, "rowcount", 0):
                    raise _Nothing
                paths = list(session.scalars(
                    update(Result).where(Result.study_uid == c.study_uid,
                                         Result.purged_at.is_(None))
                    .values(purged_at=now).returning(Result.path),
                    execution_options={"synchronize_session": False}))
                if not paths:
                    raise _Nothing
                folders = [f for f in session.scalars(select(ResultSet.folder).where(
                    ResultSet.study_uid == c.study_uid, ResultSet.folder.is_not(None))) if f]
                audit.record(session, "purged", actor=self.actor, study_uid=c.study_uid,
                             detail=f"result objects: {len(paths)}; reason {c.reason}; "
                                    f"state {c.state} (their rows and deliveries are kept)")
        except _Nothing:
            return None, []
        return paths, folders

    def _delete(self, paths: list[str], folders: list[str]) -> None:
        parents: set[Path] = set()
        for relative in paths:
            path = self._inside(relative)
            if path is None:
                continue
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for relative in folders:
            folder = self._inside(relative)
            if folder is not None and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                parents.add(folder.parent)
        # Folders left empty (series, study; results/<job>) go too; a folder that gained a
        # file meanwhile (an instance arriving) stays.
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            probe = folder
            while probe != self.root and self.root in probe.parents:
                with contextlib.suppress(OSError):
                    probe.rmdir()
                probe = probe.parent

    def _inside(self, relative: str) -> Path | None:
        """A stored path under the storage root (an absolute path elsewhere is left alone)."""
        path = (self.root / relative).resolve()
        root = self.root.resolve()
        return path if root in path.parents else None

    def _finish(self, study_uid: str, kind: str) -> None:
        column = Study.purge_finished_at if kind == RECEIVED else Study.results_purge_finished_at
        with self.database.transaction() as session:
            session.execute(update(Study).where(Study.study_uid == study_uid)
                            .values({column: self.clock()}),
                            execution_options={"synchronize_session": False})

    def _finish_interrupted(self) -> int:
        """Delete the files of purges marked but not finished (a node died in between)."""
        with self.database.transaction() as session:
            received = list(session.execute(select(Study.id, Study.study_uid).where(
                Study.purged_at.is_not(None), Study.purge_finished_at.is_(None))).all())
            results = list(session.scalars(select(Study.study_uid).where(
                Study.results_purged_at.is_not(None),
                Study.results_purge_finished_at.is_(None))))
            work: list[tuple[str, str, list[str], list[str]]] = []
            for study_id, uid in received:
                paths = list(session.scalars(select(Instance.path).where(
                    Instance.study_id == study_id, Instance.purged_at.is_not(None))))
                folders = [p for p in session.scalars(select(Job.output_path).where(
                    Job.study_uid == uid, Job.output_path.is_not(None))) if p]
                work.append((uid, RECEIVED, paths, folders))
            for uid in results:
                paths = list(session.scalars(select(Result.path).where(
                    Result.study_uid == uid, Result.purged_at.is_not(None))))
                folders = [f for f in session.scalars(select(ResultSet.folder).where(
                    ResultSet.study_uid == uid, ResultSet.folder.is_not(None))) if f]
                work.append((uid, policy.RESULTS, paths, folders))
        for uid, kind, paths, folders in work:
            logger.warning("retention: finishing an interrupted purge (%s files)", kind)
            self._delete(paths, folders)
            self._finish(uid, kind)
        return len(work)

"""Timing of study completion with APScheduler 3.x; the state itself lives in the database.

- After each stored instance: make sure a quiet-period timer exists for the study. A timer
  that fires early (more instances came) re-reads `quiet_until` and re-arms itself, so one
  timer per study suffices however many instances arrive.
- At the end of each association: check expected content (e.g. both eyes) at once.
- At start: rebuild the timers from the database (a node killed during a quiet period
  completes the study after restart) and announce completions nobody announced yet.
- Every `sweep_seconds`: complete overdue studies (missed timers, other nodes) and announce
  studies completed elsewhere (e.g. by `dicomnode study complete`).

Which rules apply is per study (`rules`, from the composition root): the node's
completeness settings, or what the preset the study routes to overrides. They may read the
study's headers, so they are asked on scheduler threads, never on the receiving one.

Hooks (`on_study_complete`) run once per completion, on a scheduler thread, after commit.
They are notifications: the durable record is the study's `complete` state, so a consumer
that must not miss one also reads that state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.assemble import completeness
from dicomnode.db.engine import Database
from dicomnode.db.models import utcnow
from dicomnode.settings import CompletenessSettings

logger = logging.getLogger(__name__)

StudyCompleteHook = Callable[[str], None]

_BUSY_RECHECK_SECONDS = 1.0


class CompletenessRules(Protocol):
    """The completeness rules of each study."""

    def for_study(self, study_uid: str) -> CompletenessSettings: ...

    def shortest_quiet_seconds(self) -> float:
        """The shortest quiet period any study can have: when a study's timer first looks."""
        ...


class NodeRules:
    """Every study gets the node's completeness settings."""

    def __init__(self, settings: CompletenessSettings) -> None:
        self.settings = settings

    def for_study(self, study_uid: str) -> CompletenessSettings:
        return self.settings

    def shortest_quiet_seconds(self) -> float:
        return self.settings.quiet_seconds


class Assembler:
    def __init__(
        self,
        database: Database,
        settings: CompletenessSettings,
        hooks: Iterable[StudyCompleteHook] = (),
        *,
        rules: CompletenessRules | None = None,
        workers: int = 4,
    ) -> None:
        self.database = database
        self.settings = settings
        self.rules = rules or NodeRules(settings)
        # Injected callables, each called with the Study Instance UID of a completed study.
        self.on_study_complete: list[StudyCompleteHook] = list(hooks)
        # Whether an association that stored into the study is still open (set by the
        # composition root to the receiver's answer). While it is, the quiet period never
        # completes the study: a sender pausing between the eyes is still sending.
        self.receiving: Callable[[str], bool] = lambda _study_uid: False
        # Every call into the scheduler goes through `_guard`, and none once stopping:
        # APScheduler 3's shutdown(wait=True) holds its job-store lock while it joins the
        # worker threads, so a job calling add_job/remove_job then would deadlock it.
        self._guard = threading.Lock()
        self._stopping = False
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(workers)},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone="UTC",
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._scheduler.start()
        self.rebuild()
        self._scheduler.add_job(
            self.sweep, "interval", seconds=self.settings.sweep_seconds, id="sweep",
            replace_existing=True,
        )

    def stop(self, wait: bool = True) -> None:
        """Stop timing; running jobs finish. Pending timers are rebuilt at the next start."""
        with self._guard:
            self._stopping = True
        with contextlib.suppress(SchedulerNotRunningError):
            self._scheduler.shutdown(wait=wait)

    def rebuild(self) -> None:
        studies = completeness.receiving_studies(self.database)
        for study_uid, quiet_until in studies:
            if quiet_until is not None:
                self._arm(study_uid, self._first_look(quiet_until))
        pending = completeness.unannounced_studies(self.database)
        for study_uid in pending:
            self._submit(self._announce_pending, study_uid)
        if studies or pending:
            logger.info("rebuilt %d quiet-period timer(s); %d completion(s) to announce",
                        len(studies), len(pending))

    # -- ReceiveListener -------------------------------------------------------------------

    def instance_stored(self, study_uid: str, quiet_until: datetime) -> None:
        with self._guard:
            if self._stopping or self._scheduler.get_job(_timer_id(study_uid)) is not None:
                return
        self._arm(study_uid, self._first_look(quiet_until))

    def association_ended(self, study_uids: set[str]) -> None:
        self._submit(self.after_association, sorted(study_uids))

    # -- jobs --------------------------------------------------------------------------------

    def after_association(self, study_uids: list[str]) -> None:
        """Expected content first; a study whose quiet period ran out while its sender was
        still connected completes now that the sender has finished. Each study's rules are
        asked once for both (they may read its headers)."""
        for study_uid in study_uids:
            rules = self.study_rules(study_uid)
            if completeness.complete_if_expected(
                self.database, study_uid, rules.expected_laterality
            ):
                self._completed(study_uid, completeness.EXPECTED_CONTENT)
            else:
                self.quiet_timer(study_uid, rules)

    def quiet_timer(self, study_uid: str, rules: CompletenessSettings | None = None) -> None:
        if self.receiving(study_uid):
            # Looked at again when the association ends; this timer is only a fallback.
            self._arm(study_uid, utcnow() + timedelta(
                seconds=max(self.settings.quiet_seconds, _BUSY_RECHECK_SECONDS)))
            return
        quiet = (rules or self.study_rules(study_uid)).quiet_seconds
        # The node's own period is the one the receiver wrote into `quiet_until`.
        check = completeness.complete_if_quiet(
            self.database, study_uid,
            quiet_seconds=None if quiet == self.settings.quiet_seconds else quiet)
        if check.completed:
            self._completed(study_uid, completeness.QUIET_PERIOD)
        elif check.recheck_at is not None:
            self._arm(study_uid, check.recheck_at)  # more instances came: wait again

    def sweep(self) -> None:
        try:
            for study_uid in completeness.due_studies(self.database):
                self.quiet_timer(study_uid)
            for study_uid in completeness.unannounced_studies(self.database):
                self._announce_pending(study_uid)
        except Exception:
            logger.exception("study sweep failed; retrying at the next sweep")

    def _announce_pending(self, study_uid: str) -> None:
        if completeness.claim_announcement(self.database, study_uid):
            self._completed(study_uid, "completed elsewhere")

    def _completed(self, study_uid: str, reason: str) -> None:
        logger.info("study complete (%s): %s", reason, study_uid)
        with self._guard, contextlib.suppress(JobLookupError, SchedulerNotRunningError):
            if not self._stopping:
                self._scheduler.remove_job(_timer_id(study_uid))  # its quiet period is moot
        for hook in list(self.on_study_complete):
            try:
                hook(study_uid)
            except Exception:
                logger.exception("on-study-complete hook %r failed", hook)

    def study_rules(self, study_uid: str) -> CompletenessSettings:
        try:
            return self.rules.for_study(study_uid)
        except Exception:  # a bug there must not hold the study forever
            logger.exception("completeness rules of study %s failed; using the node's", study_uid)
            return self.settings

    # -- scheduling helpers ----------------------------------------------------------------

    def _first_look(self, quiet_until: datetime) -> datetime:
        """`quiet_until` is the node's quiet period from the last instance; a study whose
        preset sets a shorter one is due earlier, so its timer looks that much earlier (and
        re-arms for the study's own rule)."""
        try:
            shortest = self.rules.shortest_quiet_seconds()
        except Exception:
            logger.exception("completeness rules failed; timing by the node's quiet period")
            return quiet_until
        return quiet_until - timedelta(seconds=max(0.0, self.settings.quiet_seconds - shortest))

    def _arm(self, study_uid: str, when: datetime) -> None:
        with self._guard:
            if self._stopping:
                return  # the quiet period is rebuilt from the database at the next start
            self._scheduler.add_job(
                self.quiet_timer, "date", run_date=when, args=[study_uid],
                id=_timer_id(study_uid), replace_existing=True,
            )

    def _submit(self, func: Callable[..., None], *args: object) -> None:
        with self._guard:
            if self._stopping:
                return  # the sweep at the next start picks the work up
            self._scheduler.add_job(func, args=list(args))


def _timer_id(study_uid: str) -> str:
    return f"quiet:{study_uid}"

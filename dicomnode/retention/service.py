"""The scheduled purge: an APScheduler interval job, set up at each start (no schedule is
stored; what is due is read from the database at each run)."""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta

from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.db.engine import Database
from dicomnode.db.models import utcnow
from dicomnode.retention.purge import Purger
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

_FIRST_RUN_SECONDS = 30  # after start, once the node is serving


class RetentionService:
    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.purger = Purger(settings, database)
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        retention = self.settings.retention
        if not retention.enabled:
            logger.info("retention off: received files and results are kept")
            return
        # One worker, coalesced: a purge never overlaps the next one.
        self._scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
            "coalesce": True, "max_instances": 1})
        self._scheduler.start()
        self._scheduler.add_job(
            self._run, "interval", minutes=retention.interval_minutes, id="retention-purge",
            next_run_time=utcnow() + timedelta(seconds=_FIRST_RUN_SECONDS))
        logger.info("retention on: received %s days, results %s days, failed kept %s days, "
                    "min free %d MB, every %.0f min", retention.received_days,
                    retention.results_days, retention.keep_failed_days, retention.min_free_mb,
                    retention.interval_minutes)

    def _run(self) -> None:
        try:
            self.purger.run()
        except Exception:  # the next run tries again; nothing was half-deleted unmarked
            logger.exception("retention purge failed")

    def stop(self) -> None:
        if self._scheduler is not None:
            # wait=False: a purge in progress is safe to cut off (see purge.py's order).
            with contextlib.suppress(SchedulerNotRunningError):
                self._scheduler.shutdown(wait=False)
            self._scheduler = None

"""The dispatcher: a background thread that sends due outbox rows, and its one-shot pass.

The schedule is the table itself (next_attempt_at), so a restart loses nothing: a new
dispatcher finds the pending rows, and rows a dead node left `sending` once their claim lapses.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session

from dicomnode.db import wakeups
from dicomnode.db.engine import Database
from dicomnode.db.models import Delivery, as_utc, utcnow
from dicomnode.db.transient import retrying
from dicomnode.dispatch import dicomweb, outbox
from dicomnode.dispatch.check import check_destination, describe
from dicomnode.dispatch.sender import send_batch
from dicomnode.settings import DestinationSettings, Settings

logger = logging.getLogger(__name__)

# Never spin: a row due now that a pass did not claim (another node has it) waits this long.
_MIN_WAIT_SECONDS = 0.05

# Negotiated on every association besides the batch's own classes, so that a result set's
# later objects (its SR after its SEGs and overlays) can follow on the same association.
RESULT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
)

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult:
    """What one pass did."""

    claimed: int
    sent: int
    retrying: int
    failed: int


class Dispatcher:
    """Sends queued result objects to their destinations, retrying with backoff."""

    def __init__(self, settings: Settings, database: Database, *,
                 owner: str | None = None) -> None:
        """`owner`: a stable identity (dicomnode.identity); deliveries it left `sending`
        in a previous run are due again at once when the dispatcher starts."""
        self.settings = settings
        self.database = database
        self._resume = owner is not None
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pass_lock = threading.Lock()
        # Result sets still being encoded in this process whose first objects are queued
        # (`expecting`); while there are any, an association waits for their rest.
        self._expected = 0
        self._expected_lock = threading.Lock()
        self._more = threading.Event()

    @property
    def calling_ae(self) -> str:
        return self.settings.dispatch.calling_ae_title or self.settings.node.ae_title

    def enqueue(
        self, session: Session, path: Path | str, destination_names: Iterable[str]
    ) -> list[Delivery]:
        """Queue `path` for each destination in `session`'s transaction; the loop is woken
        (call after commit is not needed: a pass that misses the row finds it next poll)."""
        rows = outbox.enqueue(session, path, destination_names,
                              known_destinations=self.settings.destinations.keys())
        self._wake.set()
        return rows

    def wake(self) -> None:
        self._wake.set()
        self._more.set()

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Held by the results pipeline from queueing a job's first objects until its last
        ones are queued: an association sending the first waits (up to
        `dispatch.linger_seconds`) for the rest, so a result set goes over one association."""
        with self._expected_lock:
            self._expected += 1
        try:
            yield
        finally:
            with self._expected_lock:
                self._expected -= 1
            self._more.set()

    def _more_for(self, name: str, accepted: frozenset[str], budget: int,
                  claimed: list[outbox.Claimed]) -> Sequence[tuple[int, Path]]:
        """Deliveries to `name` due now that the open association can carry: at once if any,
        else, while a result set is still being encoded here, as soon as they are queued
        (at most `dispatch.linger_seconds` after the association fell idle)."""
        dispatch = self.settings.dispatch
        deadline = time.monotonic() + dispatch.linger_seconds
        while not self._stop.is_set():
            self._more.clear()
            items = self._recording("claiming more deliveries", lambda: outbox.claim_due(
                self.database, dispatch, self.owner, destination=name, sop_classes=accepted,
                limit=budget))
            if items:
                claimed.extend(items)
                storage = self.settings.storage.path
                return [(i.id, _resolve(i.path, storage)) for i in items]
            with self._expected_lock:
                waiting = self._expected > 0
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                return []
            self._more.wait(remaining)
        return []

    def run_once(self) -> PassResult:
        """Claim due rows, send them per destination over one association, record outcomes."""
        with self._pass_lock:
            dispatch = self.settings.dispatch
            claimed = self._recording("claiming due deliveries", lambda: outbox.claim_due(
                self.database, dispatch, self.owner))
            by_destination: dict[str, list[outbox.Claimed]] = defaultdict(list)
            for item in claimed:
                by_destination[item.destination].append(item)
            sent = retrying = failed = 0

            def record(key: int, ok: bool, error: str | None) -> None:
                nonlocal sent, retrying, failed
                if ok:
                    self._recording(f"delivery {key} sent",
                                    lambda: outbox.mark_sent(self.database, key))
                    sent += 1
                    return
                state = self._recording(f"delivery {key} failed", lambda: (
                    outbox.mark_attempt_failed(self.database, dispatch, key,
                                               error or "unknown error")))
                if state == "failed":
                    failed += 1
                else:
                    retrying += 1

            for name, items in by_destination.items():
                destination = self.settings.destinations.get(name)
                storage = self.settings.storage.path
                pairs = [(i.id, _resolve(i.path, storage)) for i in items]
                if destination is None:
                    why = f"destination {name!r} is not in the settings"
                    for item in items:
                        record(item.id, False, why)
                elif isinstance(destination, DestinationSettings):
                    # Each object is recorded sent as soon as the PACS answers its C-STORE,
                    # not after the batch: a crash later in the batch resends less.
                    # Objects queued while the association is open (a result set's SR
                    # after its images) follow on it rather than on a new one.
                    send_batch(destination, pairs, calling_ae=self.calling_ae,
                               settings=dispatch,
                               on_outcome=lambda o: record(o.key, o.ok, o.error),
                               also_propose=RESULT_SOP_CLASSES,
                               more=functools.partial(self._more_for, name, claimed=claimed),
                               limit=dispatch.batch_size)
                else:  # DICOMweb: STOW-RS
                    for o in dicomweb.send_batch(name, destination, pairs):
                        record(o.key, o.ok, o.error)
            if claimed:
                logger.info("dispatch pass: %d claimed, %d sent, %d to retry, %d failed",
                            len(claimed), sent, retrying, failed)
            return PassResult(len(claimed), sent, retrying, failed)

    def _recording(self, what: str, operation: Callable[[], T]) -> T:
        """An outbox change, retried on a transient database error (a dropped connection):
        an object the PACS has taken must not wait out the lease and be sent again."""
        db = self.settings.database
        return retrying(operation, what=f"dispatch: {what}", attempts=db.transient_retries,
                        first_delay=db.retry_seconds)

    def _release_claims(self) -> None:
        """After a failed pass, the rows it claimed and did not finish are due at once, not
        after dispatch.lease_seconds."""
        try:
            outbox.resume_own(self.database, self.owner)
        except Exception:  # the database is still away: the lease takes over
            logger.exception("could not release the deliveries of a failed pass")

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        if self._resume:
            resumed = outbox.resume_own(self.database, self.owner)
            if resumed:
                logger.info("taking back %d delivery(ies) this node left sending", resumed)
        self.check_settings_changes()
        # Deliveries committed by anyone (results pipeline, operator, another node) wake it.
        self.database.wakeups.subscribe(wakeups.OUTBOX, self._wake)
        self._thread = threading.Thread(target=self._loop, name="dicomnode-dispatch",
                                        daemon=True)
        self._thread.start()
        logger.info("dispatcher started (%s)", self.owner)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after the pass in progress (a send is not cut off half-way)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._more.set()
        self.database.wakeups.unsubscribe(wakeups.OUTBOX, self._wake)
        thread.join(timeout if timeout is not None else
                    self.settings.dispatch.network_timeout_seconds * 2)
        self._thread = None
        logger.info("dispatcher stopped")

    def check_settings_changes(self) -> None:
        """A destination whose address or AE title changed since the last start: its failed
        deliveries may work now, so they are tried at once."""
        for name, destination in sorted(self.settings.destinations.items()):
            where = describe(destination)  # AE title and address, or the DICOMweb URL
            fingerprint = f"{where['ae_title']}@{where['address']}"
            try:
                if outbox.destination_changed(self.database, name, fingerprint):
                    count = outbox.due_now(self.database, name,
                                           reason=f"its settings changed to {fingerprint}")
                    logger.info("destination %s changed to %s: %d delivery(ies) due now",
                                name, fingerprint, count)
            except Exception:  # the loop's own passes still run; this is only a shortcut
                logger.exception("could not compare the settings of destination %s", name)

    def probe_failed_destinations(self) -> int:
        """Check each destination that has failed deliveries (C-ECHO, or QIDO-RS for DICOMweb);
        those that answer get them sent at once. Returns how many deliveries became due."""
        due = 0
        for name, destination in sorted(self.settings.destinations.items()):
            if not outbox.has_failed(self.database, name):
                continue
            outcome = check_destination(name, destination, calling_ae=self.calling_ae,
                                        settings=self.settings.dispatch)
            if outcome.ok:
                due += outbox.due_now(self.database, name, reason="it answered its check")
        return due

    def _loop(self) -> None:
        poll = self.settings.dispatch.poll_seconds
        next_probe = time.monotonic() + self.settings.dispatch.echo_seconds
        while not self._stop.is_set():
            self._wake.clear()
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + self.settings.dispatch.echo_seconds
                try:
                    if self.probe_failed_destinations():
                        continue  # send them now
                except Exception:
                    logger.exception("probing destinations with failed deliveries failed")
            try:
                result = self.run_once()
            except Exception:  # a database hiccup must not end the loop; the rows wait
                logger.exception("dispatch pass failed; trying again in %.1f s", poll)
                self._release_claims()
                result = PassResult(0, 0, 0, 0)
            # A full batch may mean more is due: go again at once.
            if result.claimed and result.claimed >= self.settings.dispatch.batch_size:
                continue
            self._wake.wait(self._until_due(poll))

    def _until_due(self, poll: float) -> float:
        """Seconds to wait: the poll, or less when a retry falls due sooner."""
        try:
            due = outbox.next_due(self.database)
        except Exception:  # the pass itself reports database trouble
            return poll
        if due is None:
            return poll
        wait = (as_utc(due) - utcnow()).total_seconds()
        return min(poll, max(wait, _MIN_WAIT_SECONDS))


def _resolve(path: str, storage_root: Path) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else storage_root / candidate

"""pynetdicom event handlers: thin and guarded.

C-STORE: validate identifiers, write the file atomically and durably (or move the file the
data set was streamed to into place: receive/streamed.py), commit the row, and only then
answer success. Any unexpected exception becomes a failure status plus an audit
row; the server thread keeps serving. No inference, no slow work on the association thread:
completion is evaluated on the scheduler's threads via the `ReceiveListener`.
Ordinary logs carry AE titles, addresses and counts, never patient data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.dsutils import encode_file_meta

from dicomnode.db.engine import Database
from dicomnode.receive import ingest, statuses, streamed
from dicomnode.receive.accept import Accepted, Acceptor, Offer, ReceiveListener, too_large
from dicomnode.receive.admission import Admission
from dicomnode.receive.identifiers import Refused
from dicomnode.receive.policy import CallerPolicy
from dicomnode.receive.tls import peer_certificate
from dicomnode.redact import safe_error
from dicomnode.settings import Settings

__all__ = ["InFlight", "ReceiveHandlers", "ReceiveListener"]

logger = logging.getLogger(__name__)

_PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass
class _AssociationLog:
    calling_ae: str
    peer: str
    studies: set[str] = field(default_factory=set)
    # The study of the latest instance it sent: the one it is sending now.
    current: str | None = None
    stored: int = 0
    late: int = 0
    duplicates: int = 0
    refused: int = 0


class InFlight:
    """Counts C-STORE handlers running, so shutdown can wait for them to finish.

    Once `close` is called no new store starts: the database is about to go away.
    """

    def __init__(self) -> None:
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    def try_enter(self) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._count += 1
            return True

    def exit(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def close_and_wait(self, timeout: float) -> bool:
        """Refuse new stores; wait up to `timeout` for running ones. True if none is left."""
        with self._cond:
            self._closed = True
            return self._cond.wait_for(lambda: self._count == 0, timeout=timeout)


class ReceiveHandlers:
    def __init__(
        self, settings: Settings, database: Database, listener: ReceiveListener | None = None
    ) -> None:
        self.settings = settings
        self.database = database
        self.listener = listener
        self.policy = CallerPolicy(settings.node.ae_title, settings.callers)
        self.acceptor = Acceptor(settings, database, listener)
        node = settings.node
        self.admission = Admission(
            max_associations=node.max_associations, per_host=node.max_associations_per_host,
            reserved=node.reserved_associations,
            request_timeout=node.association_request_timeout_seconds,
        )
        self.root: Path = settings.storage.path
        self.in_flight = InFlight()
        self._associations: dict[Any, _AssociationLog] = {}
        self._lock = threading.Lock()
        # Told the studies open associations are sending now, whenever that set changes
        # (a receiving worker process tells the main one's assembler: receive/workers.py).
        # Called with the lock held, so the calls arrive in the order of the changes.
        self.receiving_changed: Callable[[frozenset[str]], None] | None = None

    def bindings(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, self.on_opened),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            (evt.EVT_CONN_CLOSE, self.on_ended),
        ]

    # -- association ---------------------------------------------------------------------

    def on_opened(self, event: Any) -> None:
        """A TCP connection: admit it (or make room for it) before it has said anything."""
        address = event.address
        host = str(address[0]) if isinstance(address, tuple | list) else str(address)
        self.admission.opened(event.assoc, host)

    def on_requested(self, event: Any) -> None:
        """Check called AE and caller before negotiation; reject with the right diagnostic."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        peer = str(assoc.requestor.address)
        rejection = self.policy.check(called, calling, peer, peer_certificate(assoc))
        if rejection is None:
            allow_listed = not self.policy.admits_anyone
            if not self.admission.requested(assoc, allow_listed=allow_listed):
                logger.warning("association from %s@%s rejected: local limit of %d "
                               "associations reached", calling, peer,
                               self.settings.node.max_associations)
                self._audit("association-rejected", calling_ae=calling, peer=peer,
                            detail="local limit exceeded (node.max_associations"
                                   + (" + node.reserved_associations)" if allow_listed
                                      else ")"))
                # Transient, service provider (presentation), local-limit-exceeded.
                assoc.acse.send_reject(0x02, 0x03, 0x02)
                self.admission.closed(assoc)
                assoc.kill()
                return
            with self._lock:
                self._associations[assoc] = _AssociationLog(calling, peer)
            return
        self.admission.closed(assoc)
        logger.warning("association from %s@%s to %s rejected: %s",
                       calling, peer, called, rejection.reason)
        # Audit first: once the caller sees the rejection, its record is already committed.
        self._audit("association-rejected", calling_ae=calling, peer=peer,
                    detail=f"{rejection.reason} (called AE {called!r})")
        assoc.acse.send_reject(0x01, 0x01, rejection.diagnostic)
        assoc.kill()

    def on_tls_refused(self, peer: str, reason: str) -> None:
        """A TLS handshake failed: no association was requested, but the attempt is on record
        as a rejected one (the calling AE title is unknown at this point)."""
        self._audit("association-rejected", peer=peer, detail=f"TLS: {reason}")

    def on_ended(self, event: Any) -> None:
        self.admission.closed(event.assoc)
        with self._lock:
            log = self._associations.pop(event.assoc, None)
            if log is not None and log.current is not None:
                self._publish_receiving()
        if log is None:
            return  # rejected, or already reported by an earlier end event
        logger.info(
            "association from %s@%s ended: %d stored, %d late, %d duplicate, %d refused",
            log.calling_ae, log.peer, log.stored, log.late, log.duplicates, log.refused,
        )
        self.acceptor.sender_finished(log.studies)

    def _publish_receiving(self) -> None:
        """With the lock held."""
        if self.receiving_changed is None:
            return
        current = frozenset(log.current for log in self._associations.values()
                            if log.current is not None)
        try:
            self.receiving_changed(current)
        except Exception:
            logger.exception("could not report the studies being received")

    def is_receiving(self, study_uid: str) -> bool:
        """Whether an open association is sending this study now (its latest instance was
        of this study). One that moved on to another study, as a router forwarding many
        studies over one long association does, no longer holds this one back from its quiet
        period; otherwise no study would complete until that association ends."""
        with self._lock:
            return any(log.current == study_uid for log in self._associations.values())

    def on_echo(self, _event: Any) -> int:
        return statuses.SUCCESS

    # -- C-STORE ---------------------------------------------------------------------------

    def on_store(self, event: Any) -> int:
        if not self.in_flight.try_enter():
            return statuses.OUT_OF_RESOURCES  # shutting down; the sender retries later
        try:
            log = self._log_for(event)
            try:
                return self._store(event, log)
            except Refused as refusal:
                log.refused += 1
                logger.warning("instance from %s@%s refused (0x%04X): %s",
                               log.calling_ae, log.peer, refusal.status, refusal.reason)
                self._audit("refused", calling_ae=log.calling_ae, peer=log.peer,
                            sop_instance_uid=_command_uid(event), status=refusal.status,
                            detail=refusal.reason)
                return refusal.status
            except Exception as exc:
                log.refused += 1
                logger.exception("unexpected error storing an instance from %s@%s",
                                 log.calling_ae, log.peer)
                self._audit("error", calling_ae=log.calling_ae, peer=log.peer,
                            sop_instance_uid=_command_uid(event),
                            status=statuses.PROCESSING_FAILURE,
                            detail=safe_error(exc))
                return statuses.PROCESSING_FAILURE
        finally:
            self.in_flight.exit()

    def _log_for(self, event: Any) -> _AssociationLog:
        with self._lock:
            log = self._associations.get(event.assoc)
            if log is None:  # an association accepted before the handler was bound
                requestor = event.assoc.requestor
                log = _AssociationLog(str(requestor.ae_title).strip(), str(requestor.address))
                self._associations[event.assoc] = log
            return log

    def _store(self, event: Any, log: _AssociationLog) -> int:
        path = _streamed_path(event)
        if path is None:
            with event.request.DataSet.getbuffer() as data:
                accepted = self._accept(event, log, data, None)
        else:
            cut = streamed.cut_off(path)
            if cut is not None:
                raise too_large(cut, self.settings.storage.max_instance_mb,
                                "; writing stopped at the limit and nothing was kept")
            with streamed.open_received(path) as received:
                accepted = self._accept(event, log, received.data, received)
        if log.current != accepted.ids.study_uid:
            with self._lock:
                log.current = accepted.ids.study_uid
                self._publish_receiving()
        if accepted.outcome is ingest.Outcome.DUPLICATE:
            log.duplicates += 1
        elif accepted.outcome is ingest.Outcome.LATE:
            log.late += 1
        else:
            log.stored += 1
            log.studies.add(accepted.ids.study_uid)
        return statuses.SUCCESS

    def _accept(self, event: Any, log: _AssociationLog, data: memoryview,
                received: streamed.Received | None) -> Accepted:
        request = event.request
        return self.acceptor.accept(
            Offer(data=data, transfer_syntax=str(event.context.transfer_syntax),
                  sop_class_uid=str(request.AffectedSOPClassUID),
                  sop_instance_uid=str(request.AffectedSOPInstanceUID),
                  calling_ae=log.calling_ae, peer=log.peer, streamed=received),
            file_meta=lambda _ids: _PREAMBLE + encode_file_meta(event.file_meta),
        )

    def _audit(self, kind: str, **fields: Any) -> None:
        self.acceptor.audit(kind, **fields)


def _streamed_path(event: Any) -> Path | None:
    """Where pynetdicom streamed the data set (receive/streamed.py); None: it is in memory."""
    try:
        path = event.dataset_path
    except AttributeError:  # not streaming (a handler driven directly, as in tests)
        return None
    return Path(path) if path is not None else None


def _command_uid(event: Any) -> str | None:
    try:
        return str(event.request.AffectedSOPInstanceUID)[:64] or None
    except Exception:  # a malformed command must not break the refusal path
        return None

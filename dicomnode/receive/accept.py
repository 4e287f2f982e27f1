"""Accept one offered instance: the promise behind a C-STORE success and a STOW-RS "stored".

Free-space watermark, identifiers, the first copy kept for a repeated SOP Instance, the file
written atomically and fsync'd, its row committed, the study assembler told: the same steps
whichever way the instance came (DIMSE C-STORE or DICOMweb STOW-RS). A problem raises
`Refused` with the DIMSE status that names it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from dicomnode.db import audit
from dicomnode.db.engine import Database
from dicomnode.db.transient import retrying
from dicomnode.receive import ingest, statuses, storage
from dicomnode.receive.identifiers import Identifiers, Refused, read_identifiers
from dicomnode.receive.keyed_locks import FileLocks, KeyedLocks
from dicomnode.receive.sop_classes import is_encapsulated, is_implicit_vr
from dicomnode.receive.streamed import INCOMING, Received
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_BYTES_PER_MB = 1024 * 1024
# Process-wide: C-STORE and STOW-RS of the same instance at once must take turns too.
_SOP_LOCKS = KeyedLocks()


class ReceiveListener(Protocol):
    """What the receiver tells the study assembler (implemented by `Assembler`)."""

    def instance_stored(self, study_uid: str, quiet_until: datetime) -> None: ...

    def association_ended(self, study_uids: set[str]) -> None: ...


@dataclass(frozen=True)
class Offer:
    """One instance as a sender offered it."""

    data: bytes | memoryview  # the encoded data set, without File Meta Information
    transfer_syntax: str
    sop_class_uid: str  # what the sender says it is (C-STORE request, STOW-RS part's meta)
    sop_instance_uid: str
    calling_ae: str
    peer: str
    # The same data set already on disk, streamed there as it arrived: moved into place
    # rather than written again.
    streamed: Received | None = None


@dataclass(frozen=True)
class Accepted:
    ids: Identifiers
    outcome: ingest.Outcome


def too_large(size_bytes: int, limit_mb: int, detail: str = "") -> Refused:
    """The refusal of a data set over `storage.max_instance_mb` (`detail` appended)."""
    return Refused(statuses.OUT_OF_RESOURCES,
                   f"data set of {size_bytes / _BYTES_PER_MB:.1f} MB is larger than "
                   f"storage.max_instance_mb ({limit_mb} MB){detail}")


class Acceptor:
    def __init__(self, settings: Settings, database: Database,
                 listener: ReceiveListener | None) -> None:
        self.settings = settings
        self.database = database
        self.listener = listener
        self.root: Path = settings.storage.path
        # And across this node's processes: its receiving workers and the main one (STOW-RS).
        self._file_locks = (FileLocks(self.root / INCOMING / ".locks")
                            if settings.receive.processes > 1 else None)

    def accept(self, offer: Offer, file_meta: Callable[[Identifiers], bytes]) -> Accepted:
        """Store `offer` durably; `file_meta` gives the preamble and File Meta bytes."""
        if not storage.has_room(self.root, self.settings.storage.min_free_mb):
            raise Refused(statuses.OUT_OF_RESOURCES,
                          f"storage below the {self.settings.storage.min_free_mb} MB watermark")
        limit_mb = self.settings.storage.max_instance_mb
        if limit_mb and len(offer.data) > limit_mb * _BYTES_PER_MB:
            raise too_large(len(offer.data), limit_mb)
        ids = read_identifiers(
            offer.data,
            implicit_vr=is_implicit_vr(offer.transfer_syntax),
            encapsulated=is_encapsulated(offer.transfer_syntax),
            command_sop_class_uid=offer.sop_class_uid,
            command_sop_instance_uid=offer.sop_instance_uid,
        )
        relative = storage.relative_path(ids.study_uid, ids.series_uid, ids.sop_instance_uid)
        # One writer per SOP Instance at a time: of two copies sent at once, the second finds
        # the first committed and never replaces the file its row describes.
        with _SOP_LOCKS.hold(ids.sop_instance_uid), (
                contextlib.nullcontext() if self._file_locks is None
                else self._file_locks.hold(ids.sop_instance_uid)):
            result = self._write_and_record(offer, ids, relative, file_meta)
        if result is None:
            return Accepted(ids, ingest.Outcome.DUPLICATE)
        if (result.outcome is ingest.Outcome.STORED and self.listener is not None
                and result.quiet_until is not None):
            # The rows are committed; a failing timer only delays completion to the sweep.
            try:
                self.listener.instance_stored(ids.study_uid, result.quiet_until)
            except Exception:
                logger.exception("could not schedule the quiet period of a study")
        return Accepted(ids, result.outcome)

    def _write_and_record(self, offer: Offer, ids: Identifiers, relative: Path,
                          file_meta: Callable[[Identifiers], bytes]
                          ) -> ingest.IngestResult | None:
        """Write the file and commit its row; None when the instance is already held here."""
        target = self.root / relative
        # A brief database hiccup is retried here; the sender is waiting, so only briefly.
        database = self.settings.database
        held = retrying(
            lambda: ingest.held_path(self.database, ids.sop_instance_uid),
            what="looking up an instance", attempts=min(database.transient_retries, 3),
            first_delay=min(database.retry_seconds, 0.5),
        )
        if held is not None and held != relative.as_posix():
            raise Refused(statuses.DUPLICATE_SOP_INSTANCE,
                          "SOP Instance UID already held under another study or series "
                          f"({held.split('/', 1)[0]}); nothing stored")
        # Keep the first copy: a resend must not rewrite a file a row already points to.
        if held is not None and target.exists():
            self.audit("duplicate", calling_ae=offer.calling_ae, peer=offer.peer,
                       study_uid=ids.study_uid, sop_instance_uid=ids.sop_instance_uid,
                       status=statuses.SUCCESS, detail="SOP Instance already held")
            return None
        durable = self.settings.storage.fsync
        try:
            if offer.streamed is not None:
                size = storage.place_received(offer.streamed, target, file_meta(ids),
                                              durable=durable)
            else:
                size = storage.write_atomic(target, (file_meta(ids), offer.data),
                                            durable=durable)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise Refused(statuses.OUT_OF_RESOURCES, f"disk full: {exc}") from exc
            raise
        arrival = ingest.Arrival(
            ids=ids, transfer_syntax_uid=offer.transfer_syntax, path=relative.as_posix(),
            size_bytes=size, calling_ae=offer.calling_ae,
            called_ae=self.settings.node.ae_title, peer=offer.peer,
        )
        try:
            return retrying(
                lambda: ingest.record_arrival(
                    self.database, arrival,
                    quiet_seconds=self.settings.completeness.quiet_seconds),
                what="recording an instance", attempts=min(database.transient_retries, 3),
                first_delay=min(database.retry_seconds, 0.5),
            )
        except ingest.HeldElsewhere as exc:
            # Another node committed it under another path meanwhile; the rows were rolled
            # back, and the file just written is referenced by nothing.
            target.unlink(missing_ok=True)
            raise Refused(statuses.DUPLICATE_SOP_INSTANCE,
                          f"SOP Instance UID already held under another study or series "
                          f"({exc.path.split('/', 1)[0]}); nothing stored") from exc

    def sender_finished(self, study_uids: set[str]) -> None:
        """The association (or STOW-RS request) ended: check the studies' expected content."""
        if study_uids and self.listener is not None:
            try:
                self.listener.association_ended(study_uids)
            except Exception:
                logger.exception("study assembler failed at the end of an association")

    def audit(self, kind: str, **fields: Any) -> None:
        """Write an audit row in its own transaction, retried briefly over a dropped
        connection (a refusal must not lose its record); never let auditing break serving."""
        def write() -> None:
            with self.database.transaction() as session:
                audit.record(session, kind, **fields)

        database = self.settings.database
        try:
            retrying(write, what=f"writing a {kind!r} audit row",
                     attempts=min(database.transient_retries, 3),
                     first_delay=min(database.retry_seconds, 0.5))
        except Exception:
            logger.exception("could not write a %r audit row", kind)

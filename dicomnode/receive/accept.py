"""Accept one offered instance: the promise behind a C-STORE success and a STOW-RS "stored".

Free-space watermark, identifiers, the first copy kept for a repeated SOP Instance, the file
written atomically and fsync'd, its row committed, the study assembler told: the same steps
whichever way the instance came (DIMSE C-STORE or DICOMweb STOW-RS). A problem raises
`Refused` with the DIMSE status that names it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from dicomnode.db import audit
from dicomnode.db.engine import Database
from dicomnode.receive import ingest, statuses, storage
from dicomnode.receive.identifiers import Identifiers, Refused, read_identifiers
from dicomnode.receive.sop_classes import is_implicit_vr
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


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


@dataclass(frozen=True)
class Accepted:
    ids: Identifiers
    outcome: ingest.Outcome


class Acceptor:
    def __init__(self, settings: Settings, database: Database,
                 listener: ReceiveListener | None) -> None:
        self.settings = settings
        self.database = database
        self.listener = listener
        self.root: Path = settings.storage.path

    def accept(self, offer: Offer, file_meta: Callable[[Identifiers], bytes]) -> Accepted:
        """Store `offer` durably; `file_meta` gives the preamble and File Meta bytes."""
        if not storage.has_room(self.root, self.settings.storage.min_free_mb):
            raise Refused(statuses.OUT_OF_RESOURCES,
                          f"storage below the {self.settings.storage.min_free_mb} MB watermark")
        ids = read_identifiers(
            offer.data,
            implicit_vr=is_implicit_vr(offer.transfer_syntax),
            command_sop_class_uid=offer.sop_class_uid,
            command_sop_instance_uid=offer.sop_instance_uid,
        )
        relative = storage.relative_path(ids.study_uid, ids.series_uid, ids.sop_instance_uid)
        target = self.root / relative
        # Keep the first copy: a resend must not rewrite a file a row already points to.
        if target.exists() and ingest.is_stored(self.database, ids.sop_instance_uid):
            self.audit("duplicate", calling_ae=offer.calling_ae, peer=offer.peer,
                       study_uid=ids.study_uid, sop_instance_uid=ids.sop_instance_uid,
                       status=statuses.SUCCESS, detail="SOP Instance already held")
            return Accepted(ids, ingest.Outcome.DUPLICATE)
        try:
            size = storage.write_atomic(target, (file_meta(ids), offer.data),
                                        durable=self.settings.storage.fsync)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise Refused(statuses.OUT_OF_RESOURCES, f"disk full: {exc}") from exc
            raise
        result = ingest.record_arrival(
            self.database,
            ingest.Arrival(
                ids=ids, transfer_syntax_uid=offer.transfer_syntax, path=relative.as_posix(),
                size_bytes=size, calling_ae=offer.calling_ae,
                called_ae=self.settings.node.ae_title, peer=offer.peer,
            ),
            quiet_seconds=self.settings.completeness.quiet_seconds,
        )
        if (result.outcome is ingest.Outcome.STORED and self.listener is not None
                and result.quiet_until is not None):
            # The rows are committed; a failing timer only delays completion to the sweep.
            try:
                self.listener.instance_stored(ids.study_uid, result.quiet_until)
            except Exception:
                logger.exception("could not schedule the quiet period of a study")
        return Accepted(ids, result.outcome)

    def sender_finished(self, study_uids: set[str]) -> None:
        """The association (or STOW-RS request) ended: check the studies' expected content."""
        if study_uids and self.listener is not None:
            try:
                self.listener.association_ended(study_uids)
            except Exception:
                logger.exception("study assembler failed at the end of an association")

    def audit(self, kind: str, **fields: Any) -> None:
        """Write an audit row in its own transaction; never let auditing break serving."""
        try:
            with self.database.transaction() as session:
                audit.record(session, kind, **fields)
        except Exception:
            logger.exception("could not write a %r audit row", kind)

"""C-STORE and C-ECHO to a destination with pynetdicom: one association per batch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.dispatch import dimse_tls
from dicomnode.settings import DestinationSettings, DispatchSettings

logger = logging.getLogger(__name__)

# C-STORE statuses: 0x0000 success; 0xB000, 0xB007, 0xB006 warnings (stored, coerced).
_SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one object: ok, or the reason it was not stored."""

    key: int  # the caller's id for the object (the delivery row id)
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class EchoOutcome:
    destination: str
    ok: bool
    detail: str
    seconds: float


def _ae(calling_ae: str, settings: DispatchSettings) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = settings.connect_timeout_seconds
    ae.connection_timeout = settings.connect_timeout_seconds
    ae.dimse_timeout = settings.network_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
    return ae


def _associate(
    ae: AE, destination: DestinationSettings, **kwargs: Any
) -> tuple[Association, bool]:
    """`ae.associate` to `destination`, and whether the peer answered A-ASSOCIATE-RJ.

    pynetdicom can report a rejection as an abort when the peer closes the connection right
    after sending A-ASSOCIATE-RJ (seen with Orthanc in about 1 attempt in 100: the RJ PDU is
    decoded, then the closed transport wins the race to the requestor). The PDU itself, seen
    as it is decoded, is the evidence that does not race.
    """
    rejected = threading.Event()

    def on_pdu(event: Any) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejected.set()

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)],
                         tls_args=dimse_tls.tls_args(destination), **kwargs)
    return assoc, rejected.is_set()


def _where(destination: DestinationSettings) -> str:
    tls = " (TLS)" if destination.tls is not None else ""
    return f"{destination.ae_title}@{destination.host}:{destination.port}{tls}"


def _describe_failure(assoc: Association, where: str, rejected: bool) -> str:
    if assoc.is_rejected or rejected:
        return f"association rejected by {where} (check the destination's AE title and " \
               "whether it accepts our calling AE title)"
    # pynetdicom reports a refused TCP connection (or a failed TLS handshake) as an abort too.
    return f"could not connect to, or association aborted by, {where}"


# More objects for an open association: (the SOP classes it accepted, how many more it may
# carry) -> (key, path) pairs, or none to release it.
More = Callable[[frozenset[str], int], Sequence[tuple[int, Path]]]


def send_batch(
    destination: DestinationSettings,
    items: Sequence[tuple[int, Path]],
    *,
    calling_ae: str,
    settings: DispatchSettings,
    on_outcome: Callable[[StoreOutcome], None] | None = None,
    also_propose: Iterable[str] = (),
    more: More | None = None,
    limit: int | None = None,
) -> list[StoreOutcome]:
    """C-STORE `items` ((key, path) pairs) over one association; one outcome per item.

    `on_outcome` is called with each outcome as soon as it is known (e.g. the C-STORE
    response), before the next object is sent and before the association is released.
    `also_propose`: SOP classes to negotiate besides the items' own, for objects `more` may
    add. When the items are sent, `more` is asked for further objects before the
    association is released (at most `limit` objects in all on one association).
    """
    where = _where(destination)
    outcomes: list[StoreOutcome] = []

    def done(outcome: StoreOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    def read(pairs: Sequence[tuple[int, Path]]) -> list[tuple[int, pydicom.Dataset]]:
        loaded: list[tuple[int, pydicom.Dataset]] = []
        for key, path in pairs:
            try:
                loaded.append((key, pydicom.dcmread(path)))
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                done(StoreOutcome(key, False, f"cannot read {path}: {exc}"))
        return loaded

    datasets = read(items)
    if not datasets:
        return outcomes
    ae = _ae(calling_ae, settings)
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets} | set(also_propose)):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc, rejected = _associate(ae, destination, max_pdu=0)
    if not assoc.is_established:
        reason = _describe_failure(assoc, where, rejected)
        for key, _ in datasets:
            done(StoreOutcome(key, False, reason))
        return outcomes
    accepted = frozenset(str(c.abstract_syntax) for c in assoc.accepted_contexts)
    budget = len(datasets) if limit is None else max(limit, len(datasets))
    try:
        while datasets:
            budget -= len(datasets)
            for key, ds in datasets:
                _store(assoc, where, key, ds, done)
            datasets = []
            if more is not None and budget > 0 and assoc.is_established:
                datasets = read(more(accepted, budget))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _store(assoc: Association, where: str, key: int, ds: pydicom.Dataset,
           done: Callable[[StoreOutcome], None]) -> None:
    """One C-STORE on the open association, its outcome passed to `done`."""
    if not assoc.is_established:
        done(StoreOutcome(key, False, f"association to {where} was lost"))
        return
    try:
        status = assoc.send_c_store(ds)
    except (ValueError, RuntimeError) as exc:  # no accepted context, encoding
        done(StoreOutcome(key, False, f"{where}: {exc}"))
        return
    code = int(status.Status) if status is not None and "Status" in status else None
    if code in _SUCCESS_OR_WARNING:
        done(StoreOutcome(key, True))
    elif code is None:
        done(StoreOutcome(key, False, f"no C-STORE response from {where}"))
    else:
        done(StoreOutcome(key, False, f"{where} answered status 0x{code:04X}"))


def echo(
    name: str, destination: DestinationSettings, *, calling_ae: str, settings: DispatchSettings
) -> EchoOutcome:
    """C-ECHO one destination: can we associate, and does it answer Success?"""
    where = _where(destination)
    ae = _ae(calling_ae, settings)
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc, rejected = _associate(ae, destination)
    if not assoc.is_established:
        return EchoOutcome(name, False, _describe_failure(assoc, where, rejected),
                           time.monotonic() - started)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    elapsed = time.monotonic() - started
    if status is not None and "Status" in status and int(status.Status) == 0:
        return EchoOutcome(name, True, f"{where} answered C-ECHO", elapsed)
    return EchoOutcome(name, False, f"{where} did not answer C-ECHO with Success", elapsed)

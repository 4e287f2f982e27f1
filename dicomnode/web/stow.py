"""DICOMweb STOW-RS in: `POST /dicomweb/studies` (PS3.18 10.5), for gateways and PACS that
push over HTTP.

Each part (a DICOM file, `application/dicom`) goes through the receiver's own `Acceptor`, the
path a C-STORE takes: identifiers checked, file fsync'd, row committed, the study assembler
told; so "stored" in the answer is the same promise as a C-STORE success, and completeness,
routing and audit follow as for DIMSE. A part that cannot be stored is listed in the answer's
Failed SOP Sequence with a Failure Reason (PS3.18 Table 10.5.3-1; the C-STORE statuses for
the finer "cannot understand" cases) while the other parts are stored.

Only API bearer tokens of users with role `sender` or `admin` may send. The sender's user
name is the instance's calling AE title (first 16 characters), so routing conditions on
`calling_ae` can tell gateways apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID
from pynetdicom.dsutils import encode_file_meta
from starlette.concurrency import run_in_threadpool

from dicomnode.db.models import UserRole
from dicomnode.receive import ingest, statuses
from dicomnode.receive.accept import Acceptor, Offer
from dicomnode.receive.identifiers import Identifiers, Refused
from dicomnode.receive.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from dicomnode.web.auth import Principal
from dicomnode.web.deps import State, bearer_principal
from dicomnode.web.multipart_related import MultipartError, Part, parse_media_type, split
from dicomnode.web.state import WebState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
# Failure Reasons (PS3.18 Table 10.5.3-1) besides the C-STORE statuses the Acceptor raises.
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
SOP_CLASS_NOT_SUPPORTED = 0x0122

_PREAMBLE = b"\x00" * 128 + b"DICM"
_ACCEPTED_SYNTAXES = frozenset(str(uid) for uid in TRANSFER_SYNTAXES)
_ACCEPTED_CLASSES = frozenset(str(uid) for uid in STORAGE_SOP_CLASSES)


def stow_principal(
    request: Request, principal: Annotated[Principal | None, Depends(bearer_principal)]
) -> Principal:
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "send 'Authorization: Bearer <token>' of a user with role sender or admin "
            "(dicomnode users add NAME --role sender; dicomnode users token NAME)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if principal.role not in (UserRole.SENDER, UserRole.ADMIN):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"user '{principal.name}' has role {principal.role}; sending "
                            "studies needs role sender or admin")
    return principal


Sender = Annotated[Principal, Depends(stow_principal)]


@dataclass(frozen=True)
class PartResult:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure: int | None  # None: stored (or already held)
    study_uid: str | None = None


def _meta(part: Part) -> tuple[FileMetaDataset, int]:
    """The part's File Meta Information and where its data set starts; Refused if absent."""
    if part.content[128:132] != b"DICM":
        raise Refused(CANNOT_UNDERSTAND, "not a DICOM file (no DICM prefix after the preamble)")
    handle = BytesIO(part.content)
    handle.seek(132)
    try:
        meta = _read_file_meta_info(handle)
    except (ValueError, TypeError, EOFError, KeyError) as exc:
        raise Refused(CANNOT_UNDERSTAND, f"File Meta Information unreadable: {exc}") from exc
    return meta, handle.tell()


def _stored_meta(meta: FileMetaDataset, ids: Identifiers, calling_ae: str) -> bytes:
    fresh = FileMetaDataset()
    fresh.MediaStorageSOPClassUID = UID(ids.sop_class_uid)
    fresh.MediaStorageSOPInstanceUID = UID(ids.sop_instance_uid)
    fresh.TransferSyntaxUID = meta.TransferSyntaxUID
    fresh.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fresh.SourceApplicationEntityTitle = calling_ae
    # The same encoder the C-STORE path uses for its File Meta Information.
    return _PREAMBLE + encode_file_meta(fresh)


async def _body_within(request: Request, limit_mb: int) -> bytes:
    """The request body, refused with 413 once it exceeds `web.stow_max_request_mb`."""
    limit = limit_mb * 1024 * 1024
    too_large = HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                              f"the request is larger than web.stow_max_request_mb "
                              f"({limit_mb} MB); send fewer instances per request")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # chunked or lying Content-Length: stop reading now
            raise too_large
    return bytes(body)


def _store_part(acceptor: Acceptor, part: Part, calling_ae: str, peer: str) -> PartResult:
    sop_class = sop_instance = None
    try:
        if part.content_type != "application/dicom":
            raise Refused(CANNOT_UNDERSTAND, f"part type {part.content_type or 'missing'!r} is "
                          "not application/dicom")
        meta, start = _meta(part)
        sop_class = str(meta.get("MediaStorageSOPClassUID", "")).strip("\x00 ") or None
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "")).strip("\x00 ") or None
        syntax = str(meta.get("TransferSyntaxUID", "")).strip("\x00 ")
        if sop_class is None or sop_instance is None:
            raise Refused(statuses.MISSING_UID,
                          "File Meta lacks Media Storage SOP Class or Instance UID")
        if syntax not in _ACCEPTED_SYNTAXES:
            raise Refused(TRANSFER_SYNTAX_NOT_SUPPORTED,
                          f"transfer syntax {syntax or 'missing'} is not accepted")
        if sop_class not in _ACCEPTED_CLASSES:
            raise Refused(SOP_CLASS_NOT_SUPPORTED, f"SOP Class {sop_class} is not accepted")
        accepted = acceptor.accept(
            Offer(data=memoryview(part.content)[start:], transfer_syntax=syntax,
                  sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                  calling_ae=calling_ae, peer=peer),
            file_meta=lambda ids: _stored_meta(meta, ids, calling_ae),
        )
    except Refused as refusal:
        logger.warning("STOW-RS instance from %s@%s refused (0x%04X): %s",
                       calling_ae, peer, refusal.status, refusal.reason)
        acceptor.audit("refused", calling_ae=calling_ae, peer=peer,
                       sop_instance_uid=(sop_instance or "")[:64] or None,
                       status=refusal.status, detail=f"STOW-RS: {refusal.reason}")
        return PartResult(sop_class, sop_instance, refusal.status)
    except Exception as exc:
        logger.exception("unexpected error storing a STOW-RS instance from %s@%s",
                         calling_ae, peer)
        acceptor.audit("error", calling_ae=calling_ae, peer=peer,
                       sop_instance_uid=(sop_instance or "")[:64] or None,
                       status=statuses.PROCESSING_FAILURE,
                       detail=f"STOW-RS: {type(exc).__name__}: {exc}"[:2000])
        return PartResult(sop_class, sop_instance, statuses.PROCESSING_FAILURE)
    new = accepted.outcome is ingest.Outcome.STORED
    return PartResult(accepted.ids.sop_class_uid, accepted.ids.sop_instance_uid, None,
                      accepted.ids.study_uid if new else None)


def _store_all(state: WebState, parts: list[Part], calling_ae: str,
               peer: str) -> list[PartResult]:
    acceptor = Acceptor(state.settings, state.database, state.receive_listener)
    results = [_store_part(acceptor, part, calling_ae, peer) for part in parts]
    # The request is the "association": its studies' expected content is checked now.
    acceptor.sender_finished({r.study_uid for r in results if r.study_uid is not None})
    return results


def _answer(results: list[PartResult]) -> dict[str, Any]:
    answer = Dataset()
    stored, failed = [], []
    for result in results:
        item = Dataset()
        if result.sop_class_uid:
            item.ReferencedSOPClassUID = result.sop_class_uid
        if result.sop_instance_uid:
            item.ReferencedSOPInstanceUID = result.sop_instance_uid
        if result.failure is None:
            stored.append(item)
        else:
            item.FailureReason = result.failure
            failed.append(item)
    if stored:
        answer.ReferencedSOPSequence = stored
    if failed:
        answer.FailedSOPSequence = failed
    json: dict[str, Any] = answer.to_json_dict()
    return json


@router.post("/dicomweb/studies", summary="STOW-RS: store instances (multipart/related; "
             "type=\"application/dicom\"); role sender or admin")
async def store_instances(request: Request, state: State, sender: Sender) -> JSONResponse:
    media = parse_media_type(request.headers.get("content-type", ""))
    part_type = media.params.get("type", "").lower()
    if media.type != "multipart/related" or part_type != "application/dicom":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            'send multipart/related; type="application/dicom"')
    body = await _body_within(request, state.settings.web.stow_max_request_mb)
    try:
        parts = split(body, media.params.get("boundary", ""))
    except MultipartError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    if not parts:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the body holds no part")
    calling_ae = sender.name[:16]
    peer = request.client.host if request.client else "?"
    results = await run_in_threadpool(_store_all, state, parts, calling_ae, peer)
    failures = sum(1 for r in results if r.failure is not None)
    logger.info("STOW-RS from %s@%s: %d part(s), %d stored, %d failed",
                calling_ae, peer, len(results), len(results) - failures, failures)
    # 200 all stored, 202 some failed, 409 none stored (PS3.18 10.5.3).
    code = 200 if failures == 0 else 409 if failures == len(results) else 202
    return JSONResponse(_answer(results), status_code=code, media_type=DICOM_JSON)

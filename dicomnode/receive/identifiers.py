"""Validate a received data set and pull out the identifiers the node files it under.

Only the header (up to Image Laterality) is decoded; pixel data is never touched here.
A problem raises `Refused` carrying the DIMSE status to answer with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from dicomnode.receive import statuses
from dicomnode.receive.structure import MalformedDataSet, check_structure
from dicomnode.redact import safe_error, scrub

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 chars.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_LAST_TAG_NEEDED = 0x00200062  # Image Laterality; everything we read sorts before it


class Refused(Exception):
    """The instance is refused with `status`; `reason` goes to the audit trail."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Identifiers:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str | None
    modality: str | None
    laterality: str | None
    # For the operator's study list (not checked: an odd value is shown, never refused).
    study_date: str | None = None
    station_name: str | None = None


def is_valid_uid(value: str) -> bool:
    return len(value) <= 64 and _UID.match(value) is not None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    # Control characters (a NUL inside a value, escape codes of a wrong character set) have
    # no place in an identifier; PostgreSQL refuses a NUL in text outright.
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text.strip() or None


def read_identifiers(
    data: bytes | memoryview,
    *,
    implicit_vr: bool,
    command_sop_class_uid: str,
    command_sop_instance_uid: str,
    encapsulated: bool | None = None,
) -> Identifiers:
    """Check structure and identifiers of an encoded data set; raise Refused on a problem.

    `encapsulated`: whether the negotiated transfer syntax compresses pixel data (None: do
    not check how Pixel Data is encoded).
    """
    try:
        header_end = check_structure(
            data, implicit_vr=implicit_vr, header_until=_LAST_TAG_NEEDED,
            encapsulated=encapsulated,
        )
        # Decode only the header: no copy or parse of the pixel data.
        header = read_dataset(BytesIO(data[:header_end]), implicit_vr, True)
        values = {
            keyword: _text(header, keyword)
            for keyword in (
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                "PatientID", "Modality", "ImageLaterality", "Laterality", "StudyDate",
                "StationName",
            )
        }
    except MalformedDataSet as exc:
        raise Refused(statuses.UNPARSEABLE, f"unparseable data set: {scrub(str(exc))}") from exc
    except (ValueError, TypeError, UnicodeError, EOFError) as exc:  # pydicom's decode errors
        raise Refused(statuses.UNPARSEABLE, f"unparseable data set: {safe_error(exc)}") from exc

    uids: dict[str, str] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = values[keyword]
        if value is None:
            raise Refused(statuses.MISSING_UID, f"{keyword} missing or empty")
        if not is_valid_uid(value):
            raise Refused(statuses.MALFORMED_UID, f"{keyword} is not a well-formed UID")
        uids[keyword] = value
    if uids["SOPInstanceUID"] != command_sop_instance_uid.strip("\x00 "):
        raise Refused(
            statuses.SOP_INSTANCE_MISMATCH,
            "SOP Instance UID in the data set differs from the C-STORE request",
        )
    if uids["SOPClassUID"] != command_sop_class_uid.strip("\x00 "):
        raise Refused(
            statuses.SOP_CLASS_MISMATCH,
            "SOP Class UID in the data set differs from the C-STORE request",
        )
    # Image Laterality (OP, VL) is per image; Laterality is the series-level fallback.
    laterality = values["ImageLaterality"] or values["Laterality"]
    return Identifiers(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        patient_id=values["PatientID"],
        modality=values["Modality"],
        laterality=laterality.upper()[:2] if laterality else None,
        study_date=values["StudyDate"],
        station_name=values["StationName"],
    )

"""Structural check and identifier validation of received data sets (no network)."""

from __future__ import annotations

import struct

import pytest
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from dicomnode.receive import statuses
from dicomnode.receive.identifiers import Refused, is_valid_uid, read_identifiers
from dicomnode.receive.structure import MalformedDataSet, check_structure

OP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def _dataset(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = OP
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OP"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageLaterality = "L"
    ds.ReferencedImageSequence = [Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    ds.BitsAllocated = 8
    ds.PixelData = b"\x00\x01" * 32
    ds["PixelData"].VR = "OB"
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def _encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = True
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _read(ds: Dataset, data: bytes | None = None, *, implicit: bool = False):  # type: ignore[no-untyped-def]
    return read_identifiers(
        _encode(ds, implicit=implicit) if data is None else data,
        implicit_vr=implicit,
        command_sop_class_uid=OP,
        command_sop_instance_uid=str(ds.SOPInstanceUID),
    )


@pytest.mark.parametrize("implicit", [False, True])
def test_identifiers_read_in_both_vr_encodings(implicit: bool) -> None:
    ds = _dataset()
    ids = _read(ds, implicit=implicit)
    assert ids.study_uid == ds.StudyInstanceUID
    assert ids.series_uid == ds.SeriesInstanceUID
    assert ids.sop_instance_uid == ds.SOPInstanceUID
    assert (ids.patient_id, ids.modality, ids.laterality) == ("P1", "OP", "L")


def test_series_laterality_is_the_fallback() -> None:
    ids = _read(_dataset(ImageLaterality=None, Laterality="R"))
    assert ids.laterality == "R"


def test_encapsulated_pixel_data_is_well_formed() -> None:
    ds = _dataset()
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data = _encode(ds)
    assert check_structure(data, implicit_vr=False) > 0
    truncated = data[:-8]  # sequence delimiter cut off
    with pytest.raises(MalformedDataSet):
        check_structure(truncated, implicit_vr=False)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda data: data[: len(data) // 2],  # truncated inside a value
        lambda data: data[:-3],  # truncated inside the last header
        lambda data: bytes(range(256)) * 4,  # noise
        lambda data: b"",  # nothing at all
        lambda data: data[:4] + b"ZZ" + data[6:],  # unknown VR
        lambda data: data + data[:20],  # tags out of order after the end
    ],
)
def test_garbled_data_is_unparseable(mangle) -> None:  # type: ignore[no-untyped-def]
    ds = _dataset()
    with pytest.raises(Refused) as refused:
        _read(ds, mangle(_encode(ds)))
    assert refused.value.status == statuses.UNPARSEABLE


def test_length_past_the_end_is_unparseable() -> None:
    data = bytearray(_encode(_dataset()))
    # Pixel Data is last: OB/OW header is tag(4) VR(2) reserved(2) length(4).
    index = data.rfind(b"\xe0\x7f\x10\x00")
    struct.pack_into("<I", data, index + 8, 1_000_000)
    with pytest.raises(Refused) as refused:
        _read(_dataset(), bytes(data), implicit=False)
    assert refused.value.status == statuses.UNPARSEABLE


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({"StudyInstanceUID": None}, statuses.MISSING_UID),
        ({"SeriesInstanceUID": ""}, statuses.MISSING_UID),
        ({"StudyInstanceUID": "1.2.03"}, statuses.MALFORMED_UID),
        ({"SeriesInstanceUID": "1.2.3." + "4" * 64}, statuses.MALFORMED_UID),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, statuses.SOP_CLASS_MISMATCH),
    ],
)
def test_bad_identifiers_are_refused(overrides: dict[str, object], status: int) -> None:
    with pytest.raises(Refused) as refused:
        _read(_dataset(**overrides))
    assert refused.value.status == status


def test_sop_instance_must_match_the_command() -> None:
    ds = _dataset()
    with pytest.raises(Refused) as refused:
        read_identifiers(_encode(ds), implicit_vr=False, command_sop_class_uid=OP,
                         command_sop_instance_uid="1.2.3.4")
    assert refused.value.status == statuses.SOP_INSTANCE_MISMATCH


@pytest.mark.parametrize(
    ("uid", "valid"),
    [("1.2.840.10008.1.2", True), ("0.1", True), ("1", False), ("1.02", False),
     ("1.2.", False), ("1..2", False), ("1.2.a", False), ("1." + "2" * 63, False)],
)
def test_uid_form(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def _with_element(ds: Dataset, tag: int, vr: str, value: bytes, *, implicit: bool) -> bytes:
    """The encoding of `ds` with one raw element inserted (pydicom will not write it)."""
    data = _encode(ds, implicit=implicit)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    raw = head + (struct.pack("<I", len(value)) if implicit
                  else vr.encode() + struct.pack("<H", len(value))) + value
    pos = 0
    while pos < len(data):  # top-level elements of the small test data set
        group, element = struct.unpack_from("<HH", data, pos)
        if (group << 16) | element > tag:
            break
        if implicit:
            (length,) = struct.unpack_from("<I", data, pos + 4)
            pos += 8 + length
        elif data[pos + 4:pos + 6] in (b"OB", b"SQ"):
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return data[:pos] + raw + data[pos:]


@pytest.mark.parametrize(
    ("tag", "vr", "value", "implicit"),
    [
        (0x00280106, "US", b"\x01\x02\x03", False),  # Smallest Image Pixel Value, 3 bytes
        (0x00280106, "US", b"\x01\x02\x03", True),  # the dictionary says US
        (0x00280030, "FD", b"\x00" * 12, False),  # an FD of 12 bytes
    ],
)
def test_a_length_that_does_not_fit_the_vr_is_unparseable(
    implicit: bool, tag: int, vr: str, value: bytes
) -> None:
    data = _with_element(_dataset(), tag, vr, value, implicit=implicit)
    with pytest.raises(Refused) as refused:
        _read(_dataset(), data, implicit=implicit)
    assert refused.value.status == statuses.UNPARSEABLE
    assert "not a multiple" in refused.value.reason


def test_a_wrongly_typed_specific_character_set_is_unparseable() -> None:
    ds = _dataset()
    data = _with_element(ds, 0x00080005, "US", b"\x01\x00", implicit=False)
    with pytest.raises(Refused) as refused:
        _read(ds, data)
    assert refused.value.status == statuses.UNPARSEABLE


def test_native_pixel_data_under_a_compressed_syntax_is_unparseable() -> None:
    ds = _dataset()
    data = _encode(ds)  # native (defined-length) Pixel Data
    with pytest.raises(Refused) as refused:
        read_identifiers(data, implicit_vr=False, command_sop_class_uid=OP,
                         command_sop_instance_uid=str(ds.SOPInstanceUID), encapsulated=True)
    assert refused.value.status == statuses.UNPARSEABLE
    assert "native" in refused.value.reason
    # The same bytes are fine under an uncompressed syntax.
    assert read_identifiers(data, implicit_vr=False, command_sop_class_uid=OP,
                            command_sop_instance_uid=str(ds.SOPInstanceUID),
                            encapsulated=False).modality == "OP"


def test_refusal_reasons_carry_no_values() -> None:
    """A Patient's Name sent with a numeric VR: pydicom's error quotes its bytes."""
    ds = _dataset()
    data = _with_element(ds, 0x00100010, "US", b"Doe^Jane^", implicit=False)
    with pytest.raises(Refused) as refused:
        _read(ds, data)
    assert refused.value.status == statuses.UNPARSEABLE
    assert "Doe" not in refused.value.reason

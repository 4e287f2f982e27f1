"""A strict structural check of an encoded data set (little endian, implicit or explicit VR).

pydicom reads almost anything: a truncated value or random bytes come back as a "data set"
with a warning at most. A gateway must not acknowledge data it cannot read back, so this
walks the element headers (never the values, so a 12 MB image costs microseconds) and
checks that every length fits, every VR is known, sequences and items nest and close, and
tags ascend. It does not judge attribute values; that is the validator's job downstream.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from pydicom.datadict import dictionary_VR

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010

# Explicit VR: these VRs have a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)
_MAX_DEPTH = 32  # nesting deeper than this is hostile or broken, never a real image
# Binary VRs whose values are a whole number of fixed-size items (PS3.5 6.2). A length that
# does not divide is malformed: pydicom accepts it here and fails later, on first access.
_ITEM_SIZES = {
    "US": 2, "SS": 2, "OW": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "OF": 4, "OL": 4,
    "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8,
}

_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class MalformedDataSet(ValueError):
    """The bytes are not a well-formed data set in the negotiated transfer syntax."""


def check_structure(
    data: bytes | memoryview, *, implicit_vr: bool, header_until: int = 0xFFFFFFFF,
    encapsulated: bool | None = None,
) -> int:
    """Raise MalformedDataSet unless `data` is a well-formed little-endian data set.

    Returns the byte offset of the first top-level element whose tag is above
    `header_until` (or the length of the data): the header a caller needs to decode.
    `encapsulated` (when known) says whether the transfer syntax compresses pixel data:
    then top-level Pixel Data must be encapsulated (undefined length), else it must not be.
    """
    view = memoryview(data)
    if len(view) == 0:
        raise MalformedDataSet("empty data set")
    walker = _Walker(view, implicit_vr, header_until, encapsulated)
    walker.elements(0, len(view), depth=0, delimited=False)
    return walker.header_end if walker.header_end is not None else len(view)


class _Walker:
    def __init__(self, view: memoryview, implicit_vr: bool, header_until: int,
                 encapsulated: bool | None) -> None:
        self.view = view
        self.implicit_vr = implicit_vr
        self.header_until = header_until
        self.encapsulated = encapsulated
        self.header_end: int | None = None

    def _tag(self, pos: int, end: int) -> int:
        if pos + 8 > end:
            raise MalformedDataSet(f"truncated element header at byte {pos}")
        group, element = _TAG.unpack_from(self.view, pos)
        return (int(group) << 16) | int(element)

    def elements(self, pos: int, end: int, *, depth: int, delimited: bool,
                 implicit: bool | None = None) -> int:
        """Walk elements from `pos`; stop at `end`, or at an item delimiter if `delimited`."""
        if depth > _MAX_DEPTH:
            raise MalformedDataSet("sequences nested too deeply")
        implicit = self.implicit_vr if implicit is None else implicit
        previous = -1
        while pos < end:
            tag = self._tag(pos, end)
            if tag == ITEM_DELIMITER and delimited:
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise MalformedDataSet(f"unexpected item tag {tag:08X} at byte {pos}")
            if tag <= previous:
                raise MalformedDataSet(f"tag {tag:08X} out of order at byte {pos}")
            previous = tag
            if depth == 0 and self.header_end is None and tag > self.header_until:
                self.header_end = pos
            if depth == 0 and tag == PIXEL_DATA and self.encapsulated is not None:
                self._check_pixel_encoding(pos, implicit)
            pos = self._element(pos, end, tag, depth, implicit)
        if delimited:
            raise MalformedDataSet("item without an item delimiter")
        return pos

    def _element(self, pos: int, end: int, tag: int, depth: int, implicit: bool) -> int:
        vr: bytes | None = None
        length: int
        if implicit:
            (length,) = _U32.unpack_from(self.view, pos + 4)
            pos += 8
        else:
            vr = bytes(self.view[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise MalformedDataSet(f"truncated element header at byte {pos}")
                (length,) = _U32.unpack_from(self.view, pos + 8)
                pos += 12
            elif vr in _SHORT_VRS:
                (length,) = _U16.unpack_from(self.view, pos + 6)
                pos += 8
            else:
                raise MalformedDataSet(f"unknown VR {vr!r} for tag {tag:08X} at byte {pos}")
        if length == UNDEFINED:
            if tag == PIXEL_DATA:
                return self.fragments(pos, end)
            if implicit or vr == b"SQ":
                return self.sequence(pos, end, depth, implicit, delimited=True)
            if vr == b"UN":  # an undefined-length UN is a sequence encoded implicit VR LE
                return self.sequence(pos, end, depth, True, delimited=True)
            raise MalformedDataSet(f"undefined length not allowed for VR {vr!r} at byte {pos}")
        if pos + length > end:
            raise MalformedDataSet(f"value of tag {tag:08X} runs past the end at byte {pos}")
        size = _item_size(tag, vr)
        if size and length % size:
            raise MalformedDataSet(
                f"tag {tag:08X}: a length of {length} is not a multiple of {size} "
                f"for VR {_vr_name(tag, vr)} at byte {pos}")
        if vr == b"SQ":
            self.sequence(pos, pos + length, depth, implicit, delimited=False)
        return pos + length

    def _check_pixel_encoding(self, pos: int, implicit: bool) -> None:
        if implicit:
            (length,) = _U32.unpack_from(self.view, pos + 4)
        elif pos + 12 <= len(self.view):
            (length,) = _U32.unpack_from(self.view, pos + 8)
        else:
            return  # the element walk reports the truncation
        if self.encapsulated and length != UNDEFINED:
            raise MalformedDataSet(
                "native (unencapsulated) pixel data under a compressed transfer syntax")
        if not self.encapsulated and length == UNDEFINED:
            raise MalformedDataSet(
                "encapsulated pixel data under an uncompressed transfer syntax")

    def sequence(self, pos: int, end: int, depth: int, implicit: bool, *, delimited: bool) -> int:
        while pos < end:
            tag = self._tag(pos, end)
            (length,) = _U32.unpack_from(self.view, pos + 4)
            pos += 8
            if tag == SEQUENCE_DELIMITER and delimited:
                return pos
            if tag != ITEM:
                raise MalformedDataSet(f"expected an item, found {tag:08X} at byte {pos - 8}")
            if length == UNDEFINED:
                pos = self.elements(pos, end, depth=depth + 1, delimited=True, implicit=implicit)
            else:
                if pos + length > end:
                    raise MalformedDataSet(f"item runs past the end at byte {pos - 8}")
                self.elements(pos, pos + length, depth=depth + 1, delimited=False,
                              implicit=implicit)
                pos += length
        if delimited:
            raise MalformedDataSet("sequence without a sequence delimiter")
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Encapsulated pixel data: a basic offset table item, fragments, a delimiter."""
        items = 0
        while True:
            tag = self._tag(pos, end)
            (length,) = _U32.unpack_from(self.view, pos + 4)
            pos += 8
            if tag == SEQUENCE_DELIMITER:
                if items == 0:
                    raise MalformedDataSet("encapsulated pixel data without an offset table")
                return pos
            if tag != ITEM or length == UNDEFINED or pos + length > end:
                raise MalformedDataSet(f"bad pixel data fragment at byte {pos - 8}")
            pos += length
            items += 1


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    """The public dictionary's VR of `tag` (implicit VR data carries none); None if unknown."""
    if (tag >> 16) % 2:  # private: no dictionary to consult
        return None
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _item_size(tag: int, vr: bytes | None) -> int:
    """The fixed item size the value's length must be a multiple of (0: no constraint)."""
    if vr is not None:
        return _ITEM_SIZES.get(vr.decode("ascii"), 0)
    name = _dictionary_vr(tag)
    if name is None:
        return 0
    # Ambiguous dictionary VRs ('US or SS', 'OB or OW'): only a size all choices share.
    sizes = {_ITEM_SIZES.get(choice.strip(), 1) for choice in name.split(" or ")}
    return sizes.pop() if len(sizes) == 1 and 1 not in sizes else 0


def _vr_name(tag: int, vr: bytes | None) -> str:
    return vr.decode("ascii") if vr is not None else f"{_dictionary_vr(tag)} (dictionary)"

"""Byte-level edits of an encoded data set (Explicit VR Little Endian) for malformed-input tests.

pydicom refuses to write most malformed elements, and a camera's bugs are byte-level: a value
whose length does not fit its VR, a wrong VR on a known tag. These helpers find the top-level
elements of the encoded bytes and replace or insert whole elements.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


@dataclass(frozen=True)
class Span:
    tag: int
    vr: bytes
    start: int  # first byte of the element header
    value_start: int
    end: int  # one past the value (for undefined length: the end of the data)


def top_level(data: bytes) -> list[Span]:
    """Top-level elements; stops at the first undefined-length one (which then runs to the end)."""
    spans = []
    pos = 0
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            value_start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value_start = pos + 8
        end = len(data) if length == 0xFFFFFFFF else value_start + length
        spans.append(Span((group << 16) | element, vr, pos, value_start, end))
        if length == 0xFFFFFFFF:
            break
        pos = end
    return spans


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with exactly these value bytes (any length)."""
    raw_vr = vr.encode("ascii")
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + raw_vr
    if raw_vr in _LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def put(data: bytes, tag: int, vr: str, value: bytes) -> bytes:
    """`data` with the top-level element `tag` replaced (or inserted in tag order)."""
    new = element(tag, vr, value)
    for span in top_level(data):
        if span.tag == tag:
            return data[:span.start] + new + data[span.end:]
        if span.tag > tag:
            return data[:span.start] + new + data[span.start:]
    return data + new

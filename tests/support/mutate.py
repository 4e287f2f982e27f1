"""Byte-level edits of an encoded data set (Explicit VR Little Endian) for malformed-input tests.

pydicom refuses to write most malformed elements, and a camera's bugs are byte-level: a value
whose length does not fit its VR, a wrong VR on a known tag. These helpers find the top-level
elements of the encoded bytes and replace or insert whole elements; `random_mutant` makes one
seeded malformed variant (the fuzz test and scripts/soak_faults.py).
"""

from __future__ import annotations

import random
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


_VRS = ["US", "SS", "UL", "SL", "FL", "FD", "AT", "OB", "OW", "SQ", "UN", "CS", "DS", "IS",
        "PN", "LO", "UI", "DA", "UT", "XX"]


def random_mutant(template: bytes, rng: random.Random) -> bytes:
    """One malformed variant of an encoded data set: a wrong VR, a length that does not fit,
    odd value bytes, a junk element, or a flipped byte in the header."""
    spans = [s for s in top_level(template) if s.tag != 0x7FE00010]
    span = rng.choice(spans)
    # Hit the Patient's Name often: its bytes are what must never reach a log.
    if rng.random() < 0.3:
        span = next(s for s in spans if s.tag == 0x00100010)
    value = template[span.value_start:span.end]
    kind = rng.randrange(5)
    if kind == 0:  # the same value under another VR
        new = element(span.tag, rng.choice(_VRS), value)
    elif kind == 1:  # one byte more or less
        new = element(span.tag, span.vr.decode(), value + b"\x07" if rng.random() < 0.5
                      else value[:-1])
    elif kind == 2:  # a numeric element whose length does not fit its VR
        new = element(0x00280106, "US", b"\x01\x02\x03") if span.tag > 0x00280106 \
            else element(span.tag, "US", value[:3] or b"\x01")
    elif kind == 3:  # random bytes as the value
        new = element(span.tag, span.vr.decode(), rng.randbytes(rng.randrange(1, 40)))
    else:  # a flipped byte in the element header (tag, VR or length)
        header = bytearray(template[span.start:span.value_start])
        header[rng.randrange(len(header))] ^= 1 << rng.randrange(8)
        new = bytes(header) + value
    if kind == 2 and span.tag > 0x00280106:  # insert before the chosen element instead
        after = next(s for s in spans if s.tag > 0x00280106)
        return template[:after.start] + new + template[after.start:]
    return template[:span.start] + new + template[span.end:]

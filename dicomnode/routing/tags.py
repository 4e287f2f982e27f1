"""DICOM tag names for routing: keywords or group,element numbers, normalised to 'GGGGEEEE'."""

from __future__ import annotations

import re

from pydicom.datadict import keyword_for_tag, tag_for_keyword

_NUMERIC = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")


def normalise_tag(text: str) -> str:
    """'StudyDescription', '0008,1030', '(0008,1030)' or '00081030' -> '00081030'."""
    value = text.strip()
    match = _NUMERIC.match(value)
    if match:
        return (match.group(1) + match.group(2)).upper()
    number = tag_for_keyword(value)
    if number is None:
        raise ValueError(
            f"'{text}' is neither a DICOM keyword (e.g. StudyDescription) nor a tag number "
            "(e.g. 0008,1030)"
        )
    return f"{number:08X}"


def describe_tag(tag: str) -> str:
    """'00081030' -> 'StudyDescription (0008,1030)'."""
    keyword = keyword_for_tag(int(tag, 16))
    numbers = f"({tag[:4]},{tag[4:]})"
    return f"{keyword} {numbers}" if keyword else numbers

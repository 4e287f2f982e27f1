"""What the study page shows of stored objects: images as PNG, SEG segments as transparent
PNG overlays, and the SR's findings as rows. Read-only; files come from the storage root."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicomnode.errors import DecodeError, DicomNodeError
from dicomnode.inference.decode import decode_rgb
from dicomnode.redact import safe_error, scrub
from dicomnode.results.codes import unit_label

logger = logging.getLogger(__name__)

# Distinct colours for segments 1, 2, ... (RGB); alpha is set per pixel.
SEGMENT_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120),
                   (255, 120, 255), (255, 150, 60)]


class ViewError(DicomNodeError):
    """A stored object cannot be shown (unreadable, undecodable, or not of the expected kind)."""


def read(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise ViewError(f"{path.name}: cannot read: {exc}") from exc


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_png(path: Path, max_size: int) -> bytes:
    try:
        rgb = decode_rgb(read(path))
    except (DecodeError, ViewError) as exc:
        raise ViewError(scrub(str(exc))) from exc
    except Exception as exc:  # a malformed stored image: a clear 422, never a 500
        raise ViewError(f"{path.name}: cannot be shown: {safe_error(exc)}") from exc
    picture = Image.fromarray(rgb)
    picture.thumbnail((max_size, max_size))
    return _png(picture)


def _segment_of(group: Dataset | None) -> int | None:
    if group is None or "SegmentIdentificationSequence" not in group:
        return None
    return int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)


def _frame_segments(seg: Dataset, frames: int) -> list[int]:
    """Segment number of each frame: per-frame groups, else the shared group (highdicom puts
    it there when every frame belongs to one segment)."""
    shared_seq = seg.get("SharedFunctionalGroupsSequence")
    shared = _segment_of(shared_seq[0] if shared_seq else None)
    per_frame = seg.get("PerFrameFunctionalGroupsSequence") or [None] * frames
    numbers = [_segment_of(group) or shared or 1 for group in per_frame]
    if len(numbers) != frames:
        raise ViewError(f"SEG has {frames} frames but {len(numbers)} functional groups")
    return numbers


def seg_png(path: Path, max_size: int) -> bytes:
    """All segments of a SEG as one RGBA picture: coloured where set, transparent elsewhere."""
    seg = read(path)
    if getattr(seg, "Modality", "") != "SEG":
        raise ViewError(f"{path.name}: not a segmentation (modality {seg.get('Modality')})")
    frames: NDArray[Any] = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    rgba = np.zeros((*frames.shape[1:], 4), dtype=np.uint8)
    for frame, number in zip(frames, _frame_segments(seg, len(frames)), strict=True):
        colour = SEGMENT_COLOURS[(number - 1) % len(SEGMENT_COLOURS)]
        on = frame > 0
        rgba[on, :3] = colour
        rgba[on, 3] = 150
    picture = Image.fromarray(rgba, mode="RGBA")
    picture.thumbnail((max_size, max_size), resample=Image.Resampling.NEAREST)
    return _png(picture)


def _hex(number: int) -> str:
    red, green, blue = SEGMENT_COLOURS[(number - 1) % len(SEGMENT_COLOURS)]
    return f"#{red:02x}{green:02x}{blue:02x}"


def segment_labels(seg: Dataset) -> list[dict[str, Any]]:
    return [
        {"number": int(s.SegmentNumber), "label": str(s.SegmentLabel),
         "colour": _hex(int(s.SegmentNumber))}
        for s in seg.SegmentSequence
    ]


def _concept(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeMeaning) if names else ""


def _value(item: Dataset) -> str | None:
    kind = item.get("ValueType")
    if kind == "NUM":
        measured = item.MeasuredValueSequence[0] if item.get("MeasuredValueSequence") else None
        if measured is None:
            return "(no value)"
        unit = measured.MeasurementUnitsCodeSequence[0]
        return f"{float(measured.NumericValue):.4g} {unit_label(str(unit.CodeValue))}".rstrip()
    if kind == "CODE":
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    return None


def _walk(items: Any, context: str) -> Iterator[dict[str, str]]:
    for item in items:
        concept = _concept(item)
        value = _value(item)
        if value is not None and item.get("ValueType") in ("NUM", "CODE"):
            yield {"group": context, "concept": concept, "value": value}
        if item.get("ContentSequence"):
            label = context
            if item.get("ValueType") == "CONTAINER":
                # A measurement group names itself by its Tracking Identifier (e.g. the
                # image and model it is about); other containers by their concept.
                label = _tracking(item.ContentSequence) or concept
            yield from _walk(item.ContentSequence, label)


def _tracking(items: Any) -> str | None:
    for child in items:
        if child.get("ValueType") == "TEXT" and _concept(child) == "Tracking Identifier":
            return str(child.TextValue)
    return None


def sr_findings(path: Path) -> list[dict[str, str]]:
    """Coded and numeric findings of an SR, each with the container path it sits in."""
    report = read(path)
    if getattr(report, "Modality", "") != "SR":
        raise ViewError(f"{path.name}: not a structured report")
    rows = list(_walk(report.get("ContentSequence", []), ""))
    # The document root's own items (language, observer) and the image library (what the
    # images are) are not findings.
    return [r for r in rows if r["group"] and not r["group"].startswith("Image Library")]

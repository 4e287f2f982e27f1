"""A Secondary Capture per source: the fundus with the masks drawn over it and the findings
written on it, for viewers that cannot show a SEG. Burned-in text, so it is marked as such."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode import MANUFACTURER
from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.fov import find_field_of_view
from dicomnode.results.codes import unit_label
from dicomnode.results.common import patient_orientation, stamp_equipment
from dicomnode.results.eye import Eye, eye_of, series_with_eye, stamp_laterality
from dicomnode.results.model import AlgorithmInfo, ImageFindings, MaskResult

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI overlay, not for diagnosis (dicomnode)"
# Distinct colours, in mask order: yellow, cyan, magenta, green, orange, blue.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 230, 0), (0, 220, 255), (255, 0, 200), (60, 255, 60), (255, 140, 0), (70, 110, 255),
)
ALPHA = 0.45  # mask opacity: the fundus stays visible under it


def blend_masks(rgb: NDArray[np.uint8], masks: Sequence[MaskResult]) -> NDArray[np.uint8]:
    """The image with each mask tinted in its palette colour at ALPHA opacity."""
    out = rgb.copy()
    if not masks:
        return out
    wheres = [mask.mask.astype(bool) for mask in masks]
    tinted = np.logical_or.reduce(wheres)
    # Only the tinted pixels go through float32 (the same arithmetic, in the same order, as
    # blending the whole image): the rest would round back to themselves.
    blend = rgb[tinted].astype(np.float32)
    for index, where in enumerate(wheres):
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        inside = where[tinted]
        blend[inside] = blend[inside] * (1 - ALPHA) + colour * ALPHA
    out[tinted] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


Colour = tuple[int, int, int]


def overlay_text(masks: Sequence[MaskResult], findings: ImageFindings
                 ) -> tuple[list[tuple[str, Colour | None]], list[str]]:
    """(legend, findings): the header and one line per mask with its colour; then the gate,
    the classifications in class words (grades and referable flags first) and measurements."""
    legend: list[tuple[str, Colour | None]] = [("dicomnode AI overlay - not for diagnosis", None)]
    for index, mask in enumerate(masks):
        legend.append((f"[{_colour_name(index)}] {mask.label}", PALETTE[index % len(PALETTE)]))
    lines: list[str] = []
    if findings.not_analysed is not None:
        lines.append(f"NOT ANALYSED: {findings.not_analysed.reason.meaning}")
    # Outputs that feed the study summary (DR grade, referable flags) are what a grader wants.
    ordered = sorted(findings.classifications, key=lambda c: c.severity is None)
    for c in ordered:
        probability = "" if c.probability is None else f" ({c.probability:.2f})"
        lines.append(f"{c.concept.meaning}: {c.label or c.value.meaning}{probability}")
    for m in findings.measurements:
        lines.append(f"{m.code.meaning}: {m.value:.4g} {unit_label(m.unit.code)}".rstrip())
    return legend, lines


def finding_lines(masks: Sequence[MaskResult], findings: ImageFindings) -> list[str]:
    """The text written on the overlay: legend, gate, classifications, measurements."""
    legend, lines = overlay_text(masks, findings)
    return [text for text, _ in legend] + lines


def _colour_name(index: int) -> str:
    names = ("yellow", "cyan", "magenta", "green", "orange", "blue")
    return names[index % len(names)]


MARGIN = 4

Block = Sequence[str | tuple[str, Colour | None]]


@dataclass(frozen=True)
class LegendPlacement:
    """Where a text block's top-left corner goes; `extra_rows` > 0: a band added below the image."""

    x: int
    y: int
    extra_rows: int = 0


def _corners(rows: int, cols: int, w: int, h: int) -> list[tuple[int, int]]:
    """Top-left (x, y) of a `w` x `h` box (margins included) in the four corners, top-left first."""
    return [(0, 0), (cols - w, 0), (0, rows - h), (cols - w, rows - h)]


def place_legend(retina: NDArray[np.bool_], width: int, height: int,
                 taken: frozenset[int] = frozenset()) -> LegendPlacement:
    """A spot for a `width` x `height` block that covers no retina.

    The four corners not in `taken` are tried (top-left first); a corner whose box holds no
    retina pixel wins. When none is free (a square frame filled by the fundus, or a small
    image), the block goes on a black band added below the image, so the retina is never
    covered.
    """
    rows, cols = retina.shape
    w, h = width + 2 * MARGIN, height + 2 * MARGIN
    if w <= cols and h <= rows:
        for index, (x, y) in enumerate(_corners(rows, cols, w, h)):
            if index not in taken and not retina[y:y + h, x:x + w].any():
                return LegendPlacement(x + MARGIN, y + MARGIN)
    return LegendPlacement(MARGIN, rows + MARGIN, extra_rows=h)


def _font(rows: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = max(10, rows // 48)  # readable on a 2000-pixel image and on a thumbnail
    return ImageFont.load_default(size=size)


def _block_size(draw: ImageDraw.ImageDraw, lines: Sequence[str], font: Any,
                swatch: int) -> tuple[int, int]:
    width = height = 0
    for line in lines:
        box = draw.textbbox((0, height), line, font=font)
        width = max(width, int(box[2]) + swatch + 2)
        height = int(box[3]) + 3
    return width, height


def draw_text(rgb: NDArray[np.uint8], lines: Block, *more: Block,
              avoid: NDArray[np.bool_] | None = None) -> NDArray[np.uint8]:
    """Write each block of lines on dark boxes, with Pillow's built-in font (no downloads).

    A line may carry a colour: a swatch of it is drawn before the text (the legend). Each
    block goes into a corner holding none of `avoid` (the retina; default: the whole image),
    one block per corner; a block with no free corner goes on a black band added below the
    image, so the result may be taller than `rgb` and the retina is never covered.
    """
    retina = np.ones(rgb.shape[:2], dtype=bool) if avoid is None else avoid
    font = _font(rgb.shape[0])
    size = max(10, rgb.shape[0] // 48)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed: list[tuple[list[tuple[str, Colour | None]], int, int, int]] = []
    taken: set[int] = set()
    band = 0
    for block in (lines, *more):
        items = [(item, None) if isinstance(item, str) else item for item in block]
        if not items:
            continue
        swatch = size + 4 if any(colour for _, colour in items) else 0
        width, height = _block_size(probe, [text for text, _ in items], font, swatch)
        place = place_legend(retina, width, height, frozenset(taken))
        if place.extra_rows:  # stacked on the band below, one block under the other
            placed.append((items, swatch, place.x, rgb.shape[0] + band + MARGIN))
            band += place.extra_rows
            continue
        rows, cols = retina.shape
        corners = _corners(rows, cols, width + 2 * MARGIN, height + 2 * MARGIN)
        taken.add(corners.index((place.x - MARGIN, place.y - MARGIN)))
        placed.append((items, swatch, place.x, place.y))
    if band:
        rgb = np.concatenate([rgb, np.zeros((band, *rgb.shape[1:]), dtype=np.uint8)], axis=0)
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    for items, swatch, x, y in placed:
        for text, colour in items:
            box = draw.textbbox((x + swatch, y), text, font=font)
            draw.rectangle((x - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
            if colour is not None:
                draw.rectangle((x, box[1], x + size, box[1] + size), fill=colour)
            draw.text((x + swatch, y), text, fill=(255, 255, 255), font=font)
            y = int(box[3]) + 3
    return np.asarray(image, dtype=np.uint8)


def build_overlay(
    source: Dataset,
    masks: Sequence[MaskResult],
    findings: ImageFindings,
    *,
    series_instance_uid: str | None = None,
    series_number: int = 902,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    series_description: str = SERIES_DESCRIPTION,
    eye: Eye | None = None,
) -> hd.sc.SCImage:
    """The overlay image of one source, same study and patient, own series (one per eye).

    Same width as the source; taller when the legend needed a band below the fundus.
    Laterality is the header's, else the laterality model's (`eye_of`); Derivation
    Description says which.
    """
    eye = eye or eye_of(source, findings)
    plain = decode_rgb(source)
    rgb = blend_masks(plain, masks)
    legend, lines = overlay_text(masks, findings)
    rgb = draw_text(rgb, legend, lines, avoid=find_field_of_view(plain).mask)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        laterality=eye.side,
        # highdicom asks for two values; the source's own value (often empty) replaces them
        # below, so the overlay claims no orientation the camera did not record.
        patient_orientation=("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.add_new("PatientOrientation", "CS", patient_orientation(source))  # 2C: empty if unknown
    stamp_laterality(sc, eye)
    sc.SeriesDescription = series_with_eye(series_description, eye)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # findings are written into the pixels
    sc.DerivationDescription = (
        "Fundus photograph with AI segmentations and findings drawn on it. "
        f"{eye.describe()}")[:1024]  # ST
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    code = codes.DCM.Segmentation
    derivation = Dataset()
    derivation.CodeValue, derivation.CodingSchemeDesignator, derivation.CodeMeaning = (
        code.value, code.scheme_designator, code.meaning)
    sc.DerivationCodeSequence = [derivation]
    algorithms: list[AlgorithmInfo] = [m.algorithm for m in masks]
    algorithms += [c.algorithm for c in findings.classifications]
    algorithms += [m.algorithm for m in findings.measurements]
    stamp_equipment(sc, algorithms)
    logger.info("built overlay %s for source %s", sc.SOPInstanceUID, source.SOPInstanceUID)
    return sc

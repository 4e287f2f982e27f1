"""A Secondary Capture per source: the fundus with the masks drawn over it and the findings
written on it, for viewers that cannot show a SEG. Burned-in text, so it is marked as such."""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
    out = rgb.astype(np.float32)
    for index, mask in enumerate(masks):
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        where = mask.mask.astype(bool)
        out[where] = out[where] * (1 - ALPHA) + colour * ALPHA
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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


def _block_size(draw: ImageDraw.ImageDraw, lines: Sequence[str], font: Any,
                swatch: int) -> tuple[int, int]:
    width = height = 0
    for line in lines:
        box = draw.textbbox((0, 0), line, font=font)
        width = max(width, int(box[2]) + swatch)
        height += int(box[3]) + 3
    return width + 4, height


def _corners(shape: tuple[int, int], size: tuple[int, int]) -> list[tuple[int, int]]:
    """(x, y) of a block of `size` in the top-left, top-right, bottom-left, bottom-right."""
    rows, cols = shape
    width, height = size
    right = max(MARGIN, cols - width - MARGIN)
    bottom = max(MARGIN, rows - height - MARGIN)
    return [(MARGIN, MARGIN), (right, MARGIN), (MARGIN, bottom), (right, bottom)]


def _overlap(avoid: NDArray[np.bool_], corner: tuple[int, int], size: tuple[int, int]) -> int:
    x, y = corner
    return int(np.count_nonzero(avoid[y:y + size[1], x:x + size[0]]))


def draw_text(rgb: NDArray[np.uint8], lines: Sequence[str | tuple[str, Colour | None]],
              *more: Sequence[str | tuple[str, Colour | None]],
              avoid: NDArray[np.bool_] | None = None) -> NDArray[np.uint8]:
    """Write each block of lines on a dark band, with Pillow's built-in font (no downloads).

    A line may carry a colour: a swatch of it is drawn before the text (the legend). Each block
    goes into the free corner that covers the fewest `avoid` pixels (the retina), so the text
    stays in the dark corners where it can; without `avoid`, top-left then top-right.
    """
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    size = max(10, rgb.shape[0] // 48)  # readable on a 2000-pixel image and on a thumbnail
    font = ImageFont.load_default(size=size)
    used: set[int] = set()
    for block in (lines, *more):
        items = [(item, None) if isinstance(item, str) else item for item in block]
        if not items:
            continue
        swatch = size + 4 if any(colour for _, colour in items) else 0
        block_size = _block_size(draw, [text for text, _ in items], font, swatch)
        corners = _corners(rgb.shape[:2], block_size)
        order = [i for i in range(4) if i not in used] or [0]
        best = min(order, key=lambda i: _overlap(avoid, corners[i], block_size)
                   if avoid is not None else 0)
        used.add(best)
        x, y = corners[best]
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
) -> hd.sc.SCImage:
    """The overlay image of one source, same size, same study and patient, own series."""
    fundus = decode_rgb(source)
    legend, lines = overlay_text(masks, findings)
    rgb = draw_text(blend_masks(fundus, masks), legend, lines,
                    avoid=find_field_of_view(fundus).mask)
    laterality = str(source.get("ImageLaterality") or source.get("Laterality") or "") or None
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
        laterality=laterality,
        # highdicom asks for two values; the source's own value (often empty) replaces them
        # below, so the overlay claims no orientation the camera did not record.
        patient_orientation=("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    sc.add_new("PatientOrientation", "CS", patient_orientation(source))  # 2C: empty if unknown
    sc.SeriesDescription = series_description
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # findings are written into the pixels
    sc.DerivationDescription = "Fundus photograph with AI segmentations and findings drawn on it"
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

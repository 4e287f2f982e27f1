"""A Secondary Capture per source: the fundus with the masks drawn over it and the findings
written on it, for viewers that cannot show a SEG. Burned-in text, so it is marked as such."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

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
    out = rgb.astype(np.float32)
    for index, mask in enumerate(masks):
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        where = mask.mask.astype(bool)
        out[where] = out[where] * (1 - ALPHA) + colour * ALPHA
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def finding_lines(masks: Sequence[MaskResult], findings: ImageFindings) -> list[str]:
    """The text written on the overlay: legend, classifications, measurements, gate."""
    lines = ["dicomnode AI overlay - not for diagnosis"]
    for index, mask in enumerate(masks):
        lines.append(f"[{_colour_name(index)}] {mask.label}")
    if findings.not_analysed is not None:
        lines.append(f"NOT ANALYSED: {findings.not_analysed.reason.meaning}")
    for c in findings.classifications:
        probability = "" if c.probability is None else f" ({c.probability:.2f})"
        lines.append(f"{c.concept.meaning}: {c.value.meaning}{probability}")
    for m in findings.measurements:
        lines.append(f"{m.code.meaning}: {m.value:.4g} {unit_label(m.unit.code)}".rstrip())
    return lines


def _colour_name(index: int) -> str:
    names = ("yellow", "cyan", "magenta", "green", "orange", "blue")
    return names[index % len(names)]


@dataclass(frozen=True)
class LegendPlacement:
    """Where the legend's top-left corner goes; `extra_rows` > 0: a band added below the image."""

    x: int
    y: int
    extra_rows: int = 0


MARGIN = 4


def place_legend(retina: NDArray[np.bool_], width: int, height: int) -> LegendPlacement:
    """A spot for a `width` x `height` legend that covers no retina.

    The four corners are tried (top-left first); a corner whose box holds no retina pixel
    wins. When none is free (a square frame filled by the fundus, or a small image), the
    legend goes on a black band added below the image, so the retina is never covered.
    """
    rows, cols = retina.shape
    w, h = width + 2 * MARGIN, height + 2 * MARGIN
    if w <= cols and h <= rows:
        for x, y in ((0, 0), (cols - w, 0), (0, rows - h), (cols - w, rows - h)):
            if not retina[y:y + h, x:x + w].any():
                return LegendPlacement(x + MARGIN, y + MARGIN)
    return LegendPlacement(MARGIN, rows + MARGIN, extra_rows=h)


def _font(rows: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = max(10, rows // 48)  # readable on a 2000-pixel image and on a thumbnail
    return ImageFont.load_default(size=size)


def _legend_size(lines: Sequence[str], font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
                 draw: ImageDraw.ImageDraw) -> tuple[int, int]:
    width = height = 0
    for line in lines:
        box = draw.textbbox((0, height), line, font=font)
        width = max(width, int(box[2]) + 2)
        height = int(box[3]) + 3
    return width, height


def draw_text(rgb: NDArray[np.uint8], lines: Sequence[str],
              retina: NDArray[np.bool_] | None = None) -> NDArray[np.uint8]:
    """Write `lines` on dark boxes where `retina` (default: the whole image) is not; with
    Pillow's built-in font (no downloads). The result may be taller than `rgb` (see
    `place_legend`)."""
    if retina is None:
        retina = np.ones(rgb.shape[:2], dtype=bool)
    font = _font(rgb.shape[0])
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    place = place_legend(retina, *_legend_size(lines, font, probe))
    if place.extra_rows:
        band = np.zeros((place.extra_rows, *rgb.shape[1:]), dtype=np.uint8)
        rgb = np.concatenate([rgb, band], axis=0)
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    y = place.y
    for line in lines:
        box = draw.textbbox((place.x, y), line, font=font)
        draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
        draw.text((place.x, y), line, fill=(255, 255, 255), font=font)
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
    rgb = draw_text(rgb, finding_lines(masks, findings), find_field_of_view(plain).mask)
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

"""Binary Segmentation (highdicom) over one fundus photograph, one segment per mask.

Ophthalmic Photography is a multi-frame IOD, so highdicom looks for the functional groups of
an enhanced multi-frame image, which OP does not have (PITFALLS.md). The OP image is one
frame with the same pixel-level attributes as a single-frame VL Photographic image, so the
Segmentation is built from a view of the source whose SOP Class says VL Photographic, and
every reference is then pointed back at the source's real SOP Class.

No Pixel Measures are written, with or without Pixel Spacing in the source: the SEG has no
Frame of Reference, so the functional group is optional, and highdicom's own reader refuses a
Pixel Measures item without Slice Thickness, which a photograph has no value for. The SEG's
pixel grid is the source's (Spatial Locations Preserved YES), so the source's spacing applies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import DataElement, Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, VLPhotographicImageStorage, generate_uid

from dicomnode.results.codes import concept, declare_private_schemes
from dicomnode.results.common import (
    MODEL_NAME,
    patient_orientation,
    software_versions,
    stamp_equipment,
)
from dicomnode.results.eye import Eye, eye_of, series_with_eye
from dicomnode.results.model import MaskResult

logger = logging.getLogger(__name__)

_SOP_CLASS_UID = Tag("SOPClassUID")
_MEDIA_CLASS_UID = Tag("MediaStorageSOPClassUID")
_PIXEL_SPACING = Tag("PixelSpacing")

SERIES_DESCRIPTION = "AI segmentation (dicomnode)"
CONTENT_LABEL = "FUNDUS_SEG"


class SegmentationError(ValueError):
    """The masks cannot become a Segmentation of this source (message says why)."""


def _view_for_highdicom(source: Dataset) -> Dataset:
    """The source as highdicom can take it: a single-frame SOP Class, no Pixel Spacing."""
    if "SharedFunctionalGroupsSequence" in source:
        return source  # an enhanced multi-frame image: highdicom handles it as it is
    if "NumberOfFrames" in source and int(source.NumberOfFrames) != 1:
        raise SegmentationError(
            f"source {source.SOPInstanceUID} has {source.NumberOfFrames} frames; "
            "only single-frame photographs are segmented"
        )
    # A new dataset holding the source's element objects (the pixel data is shared, not
    # copied); changed elements are new ones, so the source itself is left untouched.
    view = Dataset()
    for element in source:
        if element.tag != _PIXEL_SPACING:
            view[element.tag] = element
    # Number of Frames belongs to multi-frame IODs (OP); VL Photographic and SC keep their class.
    if "NumberOfFrames" in source:
        view[_SOP_CLASS_UID] = DataElement(_SOP_CLASS_UID, "UI", VLPhotographicImageStorage)
    meta = getattr(source, "file_meta", None)
    if meta is not None:
        view.file_meta = FileMetaDataset()
        for element in meta:
            view.file_meta[element.tag] = element
        view.file_meta[_MEDIA_CLASS_UID] = DataElement(_MEDIA_CLASS_UID, "UI", view.SOPClassUID)
    return view


def _restore_references(dataset: Dataset, instance_uid: str, class_uid: str) -> int:
    """Point every reference to the source at its real SOP Class; return how many changed."""
    changed = 0
    for element in dataset:
        if element.VR != "SQ":
            continue
        for item in element.value:
            if item.get("ReferencedSOPInstanceUID") == instance_uid:
                item.ReferencedSOPClassUID = class_uid
                changed += 1
            changed += _restore_references(item, instance_uid, class_uid)
    return changed


def _check_masks(source: Dataset, masks: Sequence[MaskResult]) -> None:
    if not masks:
        raise SegmentationError("no masks to encode")
    shape = (int(source.Rows), int(source.Columns))
    for mask in masks:
        if mask.mask.shape != shape:
            raise SegmentationError(
                f"mask {mask.key} is {mask.mask.shape}, the source image is {shape}"
            )
    keys = [m.key for m in masks]
    if len(set(keys)) != len(keys):
        raise SegmentationError(f"mask keys must be unique: {keys}")


def _description(number: int, mask: MaskResult) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=mask.label[:64],
        segmented_property_category=concept(mask.category),
        segmented_property_type=concept(mask.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=mask.algorithm.name[:64],
            version=mask.algorithm.version,
            family=concept(mask.algorithm.family),
            source="dicomnode model registry",
        ),
        # The mask's key ties an SR measurement to this segment, and shows which output made it.
        tracking_id=mask.key[:64],
        tracking_uid=generate_uid(),
    )


def build_segmentation(
    source: Dataset,
    masks: Sequence[MaskResult],
    *,
    series_instance_uid: str | None = None,
    series_number: int = 900,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    device_serial_number: str = "0",
    series_description: str = SERIES_DESCRIPTION,
    eye: Eye | None = None,
) -> hd.seg.Segmentation:
    """A binary Segmentation of `source`, segment i+1 = masks[i], same pixel grid.

    Empty masks are kept (an empty segment says "looked, found nothing"). The result shares
    the source's study and patient, sits in its own series, and names the node and every
    model version in Software Versions.
    """
    _check_masks(source, masks)
    view = _view_for_highdicom(source)
    # Any non-zero value is "in the segment" (a 0/255 mask works as well as a boolean one).
    pixels = np.stack([(m.mask > 0).astype(np.uint8) for m in masks], axis=-1)[np.newaxis]
    algorithms = [m.algorithm for m in masks]
    seg = hd.seg.Segmentation(
        source_images=[view],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(i + 1, m) for i, m in enumerate(masks)],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer="dicomnode",
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(algorithms)[0],  # all versions: stamp_equipment
        device_serial_number=device_serial_number,
        series_description=series_description,
        content_label=CONTENT_LABEL,
        content_description="Fundus structures segmented by dicomnode models",
        omit_empty_frames=False,  # an empty mask is a finding too; keep one frame per segment
    )
    if view.SOPClassUID != source.SOPClassUID:
        _restore_references(seg, str(source.SOPInstanceUID), str(source.SOPClassUID))
    seg.PatientOrientation = patient_orientation(source)
    # One SEG series per eye (encode.py), named in its description. No Laterality element:
    # the Segmentation IOD has no paired body part to make it required, and dciodvfy refuses
    # it then; the eye is in the SR and the source image.
    eye = eye or eye_of(source, None)
    seg.SeriesDescription = series_with_eye(series_description, eye)
    stamp_equipment(seg, algorithms)
    declare_private_schemes(seg)
    logger.info("built SEG %s with %d segment(s) for source %s", seg.SOPInstanceUID,
                len(masks), source.SOPInstanceUID)
    return seg


def source_class_of(seg: Dataset) -> UID:
    """The SOP Class UID the Segmentation records for its source (for checks and tests)."""
    return UID(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPClassUID)

"""Source images for the encoder tests: synthetic fundus as OP (with/without Pixel Spacing),
VL Photographic and Secondary Capture, plus masks and findings made from the ground truth."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, VLPhotographicImageStorage

from dicomnode.registry.manifest import Code, UcumUnit
from dicomnode.results.model import (
    AlgorithmInfo,
    Classification,
    ImageFindings,
    MaskResult,
    MeasurementResult,
    NotAnalysed,
    RegionResult,
)
from dicomnode.synthetic import op_dataset, synthetic_fundus_with_truth
from tests.support.peers import require_tool

SourceKind = Literal["op", "op-spacing", "vl", "sc"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("op", "op-spacing", "vl", "sc")

# Attributes of the OP-specific modules a VL Photographic or SC image does not have.
_OP_ONLY = (
    "NumberOfFrames", "FrameIncrementPointer", "FrameTime", "SynchronizationFrameOfReferenceUID",
    "SynchronizationTrigger", "AcquisitionTimeSynchronized", "PatientEyeMovementCommanded",
    "HorizontalFieldOfView", "RefractiveStateSequence", "EmmetropicMagnification",
    "IntraOcularPressure", "PupilDilated", "AcquisitionDeviceTypeCodeSequence",
    "IlluminationTypeCodeSequence", "LightPathFilterTypeStackCodeSequence",
    "ImagePathFilterTypeStackCodeSequence", "LensesCodeSequence", "DetectorType",
    "ChannelDescriptionCodeSequence", "ImageLaterality", "AcquisitionDateTime",
)

VESSEL_SEG = AlgorithmInfo(model_id="vessel-seg", name="Retinal vessel segmentation",
                           version="1.2.0")
DISC_SEG = AlgorithmInfo(model_id="disc-seg", name="Optic disc segmentation", version="0.3.1")
QUALITY = AlgorithmInfo(model_id="quality", name="Image quality gate", version="2.0.0")
FOVEA = AlgorithmInfo(model_id="fovea-locator", name="Fovea locator", version="0.9.0")
DENSITY = AlgorithmInfo(model_id="vessel-density", name="Vessel density", version="1.0.0")


def private(value: str, meaning: str) -> Code:
    return Code(scheme="99DICOMNODE", value=value, meaning=meaning)


ANATOMY = Code(scheme="SCT", value="91723000", meaning="Anatomical structure")
VESSEL = Code(scheme="SCT", value="59820001", meaning="Blood vessel")
DISC = Code(scheme="SCT", value="81016008", meaning="Optic nerve head")
QUALITY_CONCEPT = private("QUAL", "Image quality")
GRADABLE = private("GRAD", "Gradable")
UNGRADABLE = private("UNGR", "Ungradable")
DENSITY_CODE = private("VDEN", "Vessel area fraction")
FOVEA_CODE = private("FOVEA", "Fovea centre")
DISC_BOX = private("DISCBOX", "Optic disc bounding box")
DISC_AREA = Code(scheme="99DICOMNODE", value="DAREA", meaning="Optic disc area")


def source_image(
    kind: SourceKind, *, laterality: Literal["L", "R"] = "R", size: int = 96, seed: int = 0,
    study_uid: str | None = None,
) -> tuple[Dataset, NDArray[np.bool_], NDArray[np.bool_]]:
    """(source dataset, vessel mask, disc mask) for one synthetic fundus image."""
    rgb, truth = synthetic_fundus_with_truth(size, laterality, seed)
    spacing = (0.0117, 0.0117) if kind == "op-spacing" else None
    ds = op_dataset(rgb, laterality=laterality, pixel_spacing=spacing, study_uid=study_uid)
    if kind in ("vl", "sc"):
        for keyword in _OP_ONLY:
            if keyword in ds:
                delattr(ds, keyword)
        ds.Laterality = laterality  # General Series: the side, where OP has Image Laterality
        if kind == "vl":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = VLPhotographicImageStorage
            ds.Modality = "XC"
        else:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            ds.Modality = "OT"
            ds.ConversionType = "WSD"
            del ds.AnatomicRegionSequence
    rows, cols = np.mgrid[0:size, 0:size]
    cy, cx = truth.disc_center
    disc = (rows - cy) ** 2 + (cols - cx) ** 2 <= truth.disc_radius**2
    return ds, truth.vessel_mask.copy(), disc


def masks_for(vessels: NDArray[np.bool_], disc: NDArray[np.bool_]) -> list[MaskResult]:
    return [
        MaskResult(key="vessel-seg.vessel_mask", label="Retinal vessels", category=ANATOMY,
                   type=VESSEL, algorithm=VESSEL_SEG, mask=vessels),
        MaskResult(key="disc-seg.disc_mask", label="Optic disc", category=ANATOMY, type=DISC,
                   algorithm=DISC_SEG, mask=disc),
    ]


def findings_for(vessels: NDArray[np.bool_], disc: NDArray[np.bool_]) -> ImageFindings:
    return ImageFindings(
        classifications=[Classification(QUALITY, QUALITY_CONCEPT, GRADABLE, 0.9731)],
        measurements=[
            MeasurementResult(DENSITY, DENSITY_CODE, float(vessels.mean()),
                              UcumUnit(code="1", meaning="no units"),
                              mask_key="vessel-seg.vessel_mask"),
            MeasurementResult(DISC_SEG, DISC_AREA, float(disc.sum()),
                              UcumUnit(code="{pixels}", meaning="pixels"),
                              mask_key="disc-seg.disc_mask"),
        ],
        finding_sites={"disc-seg": DISC},
        regions=[
            RegionResult(FOVEA, FOVEA_CODE, "point", (40.5, 47.25)),
            RegionResult(FOVEA, DISC_BOX, "box", (60.0, 30.0, 80.0, 52.0)),
        ],
    )


def ungradable() -> ImageFindings:
    return ImageFindings(
        classifications=[Classification(QUALITY, QUALITY_CONCEPT, UNGRADABLE, 0.88)],
        not_analysed=NotAnalysed(algorithm=QUALITY, reason=UNGRADABLE,
                                 skipped_models=("vessel-seg", "disc-seg")),
    )


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's findings for a file (every line it printed)."""
    tool = require_tool("dciodvfy", "dicom3tools")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("Error")]


def content_items(items: Any) -> Iterator[Any]:
    """Every SR content item under `items` (a ContentSequence), depth first."""
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from content_items(item.ContentSequence)


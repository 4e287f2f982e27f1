"""Wrap a synthetic fundus picture as the Ophthalmic Photography 8 Bit Image a camera sends.

The attributes follow the OP 8 Bit Image IOD (PS3.3 A.39): patient, general study, general
series, OP series, general equipment, general image, image pixel, multi-frame, acquisition
context, OP image, ocular region imaged, OP acquisition parameters, OP photographic parameters
and SOP common. Type 2 attributes a camera leaves empty are present and empty, as the standard
asks. `dciodvfy` reports no errors for the result.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from dicomnode.synthetic.fundus import synthetic_fundus

logger = logging.getLogger(__name__)

OP_8BIT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")

MANUFACTURER = "dicomnode synthetic"
MODEL_NAME = "Synthetic Fundus Camera"
STATION_NAME = "SYNTHCAM1"
SOFTWARE_VERSION = "dicomnode-synthetic 1"
HORIZONTAL_FIELD_OF_VIEW_DEG = 45.0
# PS3.6 well-known frame of reference: Universal Coordinated Time.
UTC_SYNCHRONIZATION_UID = "1.2.840.10008.15.1.1"


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _uid(value: str | None) -> UID:
    return UID(value) if value is not None else generate_uid()


def op_dataset(
    rgb: NDArray[np.uint8],
    *,
    laterality: Literal["L", "R"],
    patient_id: str = "DEMO0001",
    patient_name: str = "Demo^Patient",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    pixel_spacing: Sequence[float] | None = None,
    study_date: datetime | None = None,
) -> Dataset:
    """An Ophthalmic Photography 8 Bit Image holding `rgb` (H, W, 3) uint8.

    `pixel_spacing` is (row, column) spacing in mm; most cameras leave it out, so by
    default it is absent. Save with `ds.save_as(path, enforce_file_format=True)`.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    when = study_date if study_date is not None else datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    sop_uid = _uid(sop_instance_uid)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = OP_8BIT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    # SOP common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = OP_8BIT_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time

    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""

    # General study
    ds.StudyInstanceUID = _uid(study_uid)
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Fundus photography"

    # General series + OP series: one series per eye, as fundus cameras do.
    ds.Modality = "OP"
    ds.SeriesInstanceUID = _uid(series_uid)
    ds.SeriesNumber = 1 if laterality == "R" else 2
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = f"Colour fundus {'right' if laterality == 'R' else 'left'} eye"
    # No series-level Laterality: for OP it is conditional on Image Laterality being absent
    # (dciodvfy reports it as an error otherwise); the side is in Image Laterality below.

    # General equipment
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "Synthetic Eye Clinic"
    ds.StationName = STATION_NAME
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = SOFTWARE_VERSION

    # General image + OP image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = f"{date}{time}"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]  # a third value is for DERIVED images only
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = "Synthetic image made by dicomnode; not a patient."

    # Image pixel (RGB, interleaved) and multi-frame (OP is multi-frame capable: one frame).
    rows, columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time: the frame-to-frame relation of OP
    ds.FrameTime = 0.0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    if pixel_spacing is not None:
        if len(pixel_spacing) != 2 or min(pixel_spacing) <= 0:
            raise ValueError(f"pixel_spacing must be two positive numbers, got {pixel_spacing}")
        ds.PixelSpacing = [float(v) for v in pixel_spacing]

    # Synchronization (mandatory for OP): a free-running camera clock, not synchronised.
    ds.SynchronizationFrameOfReferenceUID = UTC_SYNCHRONIZATION_UID
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"

    # Acquisition context: no context items recorded (type 2, empty).
    ds.AcquisitionContextSequence = []

    # Ocular region imaged
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = [_code_item(codes.SCT.Retina)]

    # OP acquisition parameters: undilated, no refraction recorded (type 2, empty).
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = HORIZONTAL_FIELD_OF_VIEW_DEG
    ds.RefractiveStateSequence = []
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = "NO"

    # OP photographic parameters
    ds.AcquisitionDeviceTypeCodeSequence = [_code_item(codes.SCT.FundusCamera)]
    ds.IlluminationTypeCodeSequence = [_code_item(codes.DCM.DiffuseDirectIllumination)]
    ds.LightPathFilterTypeStackCodeSequence = [_code_item(codes.DCM.NoFilter)]
    ds.ImagePathFilterTypeStackCodeSequence = [_code_item(codes.DCM.NoFilter)]
    ds.LensesCodeSequence = []
    ds.DetectorType = "CMOS"
    ds.ChannelDescriptionCodeSequence = [_code_item(codes.SCT.FullSpectrum)]
    return ds


def demo_study(
    out_dir: Path,
    *,
    size: int = 1024,
    seed: int = 0,
    patient_id: str = "DEMO0001",
    study_uid: str | None = None,
    pixel_spacing: Sequence[float] | None = None,
) -> list[Path]:
    """Write a two-eye study (R then L, one series per eye) into `out_dir`; return the paths.

    `pixel_spacing` (row, column mm) is written into both images when given (off by default,
    as on most cameras)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = _uid(study_uid)
    when = datetime.now().replace(microsecond=0)
    paths: list[Path] = []
    for laterality in ("R", "L"):
        rgb = synthetic_fundus(size, laterality, seed)
        ds = op_dataset(
            rgb,
            laterality=laterality,
            patient_id=patient_id,
            study_uid=study,
            study_date=when,
            pixel_spacing=pixel_spacing,
        )
        # The Patient ID may hold characters a file name cannot (e.g. '/').
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", patient_id)
        path = out_dir / f"{safe_id}_{laterality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        logger.info("wrote synthetic %s eye to %s", laterality, path)
        paths.append(path)
    return paths

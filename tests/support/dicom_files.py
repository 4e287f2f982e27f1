"""Small Ophthalmic Photography files for tests, made in code with the synthetic generator."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import generate_uid

from dicomnode.synthetic import op_dataset, synthetic_fundus


@lru_cache(maxsize=8)
def _picture(size: int, laterality: str) -> NDArray[np.uint8]:
    return synthetic_fundus(size, laterality, 0)  # type: ignore[arg-type]


def write_op(
    path: Path,
    *,
    laterality: str = "R",
    study_uid: str | None = None,
    size: int = 96,
    patient_id: str = "TEST0001",
) -> Path:
    """Write an Ophthalmic Photography 8 Bit file (Explicit VR Little Endian)."""
    ds = op_dataset(
        _picture(size, laterality), laterality=laterality,  # type: ignore[arg-type]
        patient_id=patient_id, study_uid=study_uid or generate_uid(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(directory: Path, *, size: int = 96, patient_id: str = "TEST0001",
                lateralities: str = "RL") -> tuple[str, list[Path]]:
    study_uid = generate_uid()
    paths = [
        write_op(directory / f"{lat}.dcm", laterality=lat, study_uid=study_uid, size=size,
                 patient_id=patient_id)
        for lat in lateralities
    ]
    return study_uid, paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file: everything after the File Meta Information."""
    with path.open("rb") as handle:
        read_preamble(handle, False)
        _read_file_meta_info(handle)
        return handle.read()

"""What every result object shares: manufacturer, software versions, patient orientation."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom import Dataset

from dicomnode import MANUFACTURER, __version__
from dicomnode.results.model import AlgorithmInfo

MODEL_NAME = "dicomnode"
LO_MAX = 64


def software_versions(algorithms: Iterable[AlgorithmInfo]) -> list[str]:
    """Software Versions (0018,1020): the node first, then each model as id@version."""
    values = [f"dicomnode {__version__}"]
    for key in sorted({a.key for a in algorithms}):
        values.append(key[:LO_MAX])
    return values


def stamp_equipment(dataset: Dataset, algorithms: Iterable[AlgorithmInfo]) -> None:
    """General Equipment: who made this object, with the model versions that made its content."""
    dataset.Manufacturer = MANUFACTURER
    dataset.ManufacturerModelName = MODEL_NAME
    dataset.SoftwareVersions = software_versions(algorithms)


def patient_orientation(source: Dataset) -> str | list[str]:
    """The source's Patient Orientation (type 2C in General Image), empty when it has none.

    A derived image without a Frame of Reference must carry it (dciodvfy reports it missing
    otherwise); copying the source's keeps the same meaning for the same pixel grid.
    """
    value = source.get("PatientOrientation", "")
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return [str(v) for v in value]

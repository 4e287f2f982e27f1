"""What the encoders take: plain values, independent of how the executor stores its outputs.

The lead's glue maps a job's stored outputs (index.json + npz) onto these; the encoders never
read files or the database, so they can be tested with synthetic inputs alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from dicomnode.registry.manifest import Code, Manifest, UcumUnit

# Algorithm Family of every model (CID 7162), as pydicom's codes.DCM.ArtificialIntelligence.
AI_FAMILY = Code(scheme="DCM", value="123110", meaning="Artificial Intelligence")


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that made a result: written into SEG segments and SR items."""

    model_id: str
    name: str
    version: str
    family: Code = AI_FAMILY

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> AlgorithmInfo:
        return cls(model_id=manifest.id, name=manifest.name, version=manifest.version)

    @property
    def key(self) -> str:
        return f"{self.model_id}@{self.version}"


@dataclass(frozen=True)
class MaskResult:
    """One binary mask over the source image's full pixel matrix (rows, columns)."""

    key: str  # "<model-id>.<output-name>": written as the segment's Tracking ID
    label: str
    category: Code
    type: Code
    algorithm: AlgorithmInfo
    mask: NDArray[np.bool_]
    description: str | None = None


@dataclass(frozen=True)
class Classification:
    """A classifier's answer for one image, e.g. concept "Image quality" -> "Gradable"."""

    algorithm: AlgorithmInfo
    concept: Code
    value: Code
    probability: float | None = None
    label: str | None = None  # the manifest's class label, the word the overlay writes
    # Rank of the class from best (0) to worst, when the output feeds the study summary
    # (`summary: worst` in the manifest); None otherwise.
    severity: int | None = None


@dataclass(frozen=True)
class MeasurementResult:
    """A number for one image; `mask_key` names the mask it was measured on, if any."""

    algorithm: AlgorithmInfo
    code: Code
    value: float
    unit: UcumUnit
    mask_key: str | None = None


@dataclass(frozen=True)
class RegionResult:
    """A detection on one image: a point (x, y) or a box (x0, y0, x1, y1), source pixels."""

    algorithm: AlgorithmInfo
    code: Code
    kind: Literal["point", "box"]
    coordinates: tuple[float, ...]

    def __post_init__(self) -> None:
        expected = 2 if self.kind == "point" else 4
        if len(self.coordinates) != expected:
            raise ValueError(f"a {self.kind} has {expected} coordinates, "
                             f"got {len(self.coordinates)}")


@dataclass(frozen=True)
class NotAnalysed:
    """A gate stopped the image: the gate's model and the class that stopped it."""

    algorithm: AlgorithmInfo
    reason: Code  # the gating class's code, e.g. Ungradable
    skipped_models: Sequence[str] = ()


@dataclass(frozen=True)
class NotRun:
    """A model of the graph that did not analyse the image: the coded reason and its detail."""

    algorithm: AlgorithmInfo
    reason: Code  # e.g. 99DICOMNODE NA-MONOCHROME "Monochrome image"
    detail: str = ""


@dataclass(frozen=True)
class ImageFindings:
    """Everything the SR says about one source image."""

    classifications: Sequence[Classification] = ()
    measurements: Sequence[MeasurementResult] = ()
    not_analysed: NotAnalysed | None = None
    regions: Sequence[RegionResult] = ()
    # Finding site per model id; models not named here report on the retina.
    finding_sites: dict[str, Code] = field(default_factory=dict)
    # "R" / "L" as a laterality model read it from the image; used only where the header has
    # no laterality (the header always wins).
    inferred_laterality: str | None = None
    # Every model of the job's graph that did not analyse this image, with why.
    not_run: Sequence[NotRun] = ()

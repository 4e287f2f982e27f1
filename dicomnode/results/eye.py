"""Which eye a derived object shows: the source header's laterality, else a laterality model's.

Overlay images carry it as General Series Laterality (type 2C: required for a paired organ);
SEG and overlay objects are grouped into one series per eye, so that a series never mixes both eyes
(dcentvfy checks series-level attributes across the instances of a series).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydicom import Dataset

from dicomnode.results.codes import LATERALITY_CONCEPT
from dicomnode.results.model import ImageFindings

# Series-number offset per eye, added to each object kind's base number (docs/results.md).
SERIES_OFFSET = {"R": 0, "L": 10, None: 20}
EYE_WORDS = {"R": "right eye", "L": "left eye"}


@dataclass(frozen=True)
class Eye:
    side: Literal["R", "L"] | None  # None: neither the header nor a model says
    origin: Literal["header", "model"] | None = None
    model: str | None = None  # id@version of the laterality model, when origin == "model"

    @property
    def series_key(self) -> str:
        return self.side or "U"

    @property
    def series_offset(self) -> int:
        return SERIES_OFFSET[self.side]

    def describe(self) -> str:
        """One phrase for Derivation Description: which eye and who said so."""
        if self.side is None:
            return "Laterality unknown: not in the source header and not inferred"
        word = EYE_WORDS[self.side]
        if self.origin == "header":
            return f"Laterality {self.side} ({word}) from the source header"
        by = f" by {self.model}" if self.model else ""
        return f"Laterality {self.side} ({word}) inferred from the image{by}; not in the header"


def _side(value: object) -> Literal["R", "L"] | None:
    text = str(value or "").strip().upper()
    if text == "R":
        return "R"
    if text == "L":
        return "L"
    return None


def eye_of(source: Dataset, findings: ImageFindings | None) -> Eye:
    """The header's R / L (Image Laterality, else Laterality) wins; else the model's."""
    header = _side(source.get("ImageLaterality")) or _side(source.get("Laterality"))
    if header is not None:
        return Eye(header, "header")
    inferred = _side(findings.inferred_laterality) if findings is not None else None
    if inferred is None:
        return Eye(None)
    assert findings is not None
    model = next((c.algorithm.key for c in findings.classifications
                  if (c.concept.scheme, c.concept.value) == LATERALITY_CONCEPT), None)
    return Eye(inferred, "model", model)


def series_with_eye(description: str, eye: Eye) -> str:
    """`description`, naming the eye the series holds (LO: 64 characters)."""
    return f"{description}, {EYE_WORDS.get(eye.side or '', 'eye unknown')}"[:64]


def stamp_laterality(dataset: Dataset, eye: Eye) -> None:
    """General Series Laterality: R / L, or empty (type 2) when nobody knows the eye."""
    dataset.add_new("Laterality", "CS", eye.side or "")

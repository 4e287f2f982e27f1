"""Why a model did not analyse an image: a coded reason plus the detail people read.

Every model of a job's graph that did not run on an image records one `NotAnalysedReason`
for it, so the SR ("Not analysed" = the code), `dicomnode job show`, the API and the console
can all say why. DCM and SNOMED CT (pydicom 3.0's code dictionary) were checked: they hold
image-quality ratings (e.g. DCM 122742 "Poor image quality", for echocardiography) and the
filter "Red free" (SCT 405739002), but no concept for "this image was not analysed because
...", so the reasons use the node's declared private scheme 99DICOMNODE (docs/results.md).
A gate may declare its own code per ineligible class (`gate.reasons` in the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRIVATE_SCHEME = "99DICOMNODE"


@dataclass(frozen=True)
class NotAnalysedReason:
    """A coded reason (`scheme`, `value`, `meaning`) and the detail for this image."""

    value: str
    meaning: str
    detail: str
    scheme: str = PRIVATE_SCHEME

    def with_detail(self, detail: str) -> NotAnalysedReason:
        return NotAnalysedReason(self.value, self.meaning, detail, self.scheme)

    def to_dict(self) -> dict[str, str]:
        return {"scheme": self.scheme, "value": self.value, "meaning": self.meaning,
                "detail": self.detail}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NotAnalysedReason:
        return cls(value=str(data["value"]), meaning=str(data["meaning"]),
                   detail=str(data.get("detail") or data["meaning"]),
                   scheme=str(data.get("scheme") or PRIVATE_SCHEME))


def _reason(value: str, meaning: str) -> NotAnalysedReason:
    return NotAnalysedReason(value, meaning, meaning)


# The node's own reasons (the table in docs/results.md). A gate's class may bring its own.
UNGRADABLE = _reason("NA-UNGRADABLE", "Ungradable image")
NOT_FUNDUS = _reason("NA-NOT-FUNDUS", "Not a fundus photograph")
MONOCHROME = _reason("NA-MONOCHROME", "Monochrome image")
TOO_SMALL = _reason("NA-TOO-SMALL", "Image too small")
MODALITY = _reason("NA-MODALITY", "Modality not accepted")
GATED = _reason("NA-GATED", "Stopped by a gate")
UPSTREAM_FAILED = _reason("NA-UPSTREAM-FAILED", "Upstream model failed")
UPSTREAM_SKIPPED = _reason("NA-UPSTREAM-SKIPPED", "Upstream model did not analyse the image")
MODEL_FAILED = _reason("NA-MODEL-FAILED", "Model failed")

ALL_REASONS = (UNGRADABLE, NOT_FUNDUS, MONOCHROME, TOO_SMALL, MODALITY, GATED,
               UPSTREAM_FAILED, UPSTREAM_SKIPPED, MODEL_FAILED)

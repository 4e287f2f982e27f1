"""Codes the result objects use, and the declaration of private coding schemes.

Standard codes come from pydicom's dictionary (DCM, SCT). Concepts that have no standard code
use the private scheme 99DICOMNODE, which every object that uses it declares in its Coding
Scheme Identification Sequence (PS3.3 C.12.1.1.4). docs/results.md lists them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from dicomnode.registry.manifest import Code

PRIVATE_SCHEME = "99DICOMNODE"
PRIVATE_SCHEME_NAME = "dicomnode private codes"
PRIVATE_SCHEME_ORGANISATION = "dicomnode project"

# Schemes defined by the standard (PS3.16 Table 8-1) need no declaration in the object.
STANDARD_SCHEMES = frozenset(
    {"DCM", "SCT", "SRT", "LN", "UCUM", "FMA", "NCIt", "RADLEX", "UMLS", "ACR", "ICD10",
     "I10", "MDC", "NEU", "UBERON", "NCBITaxon", "ISO3166_1", "I11", "RFC5646", "ISO639_1",
     "ISO639_2"}
)

RETINA = codes.SCT.Retina  # SCT 5665001
OPTIC_DISC = codes.SCT.OpticNerveHead  # SCT 81016008 "Optic nerve head" (optic disc)
RIGHT = codes.SCT.Right  # SCT 24028007
LEFT = codes.SCT.Left  # SCT 7771000
IMAGING_MEASUREMENT_REPORT = codes.DCM.ImagingMeasurementReport  # DCM 126000
DEVICE = codes.DCM.Device  # DCM 121007

# No standard code says "automated analysis of colour fundus photographs" (TID 1500's
# Procedure Reported, CID 100 is extensible): private.
PROCEDURE_FUNDUS_ANALYSIS = PydicomCode(
    "FUNDUS-AI", PRIVATE_SCHEME, "Automated analysis of fundus photograph"
)
# The explicit "this image was not analysed" item; its value is the gate's coded reason.
NOT_ANALYSED = PydicomCode("NOT-ANALYSED", PRIVATE_SCHEME, "Not analysed")
# Probability that a classifier gave its answer, unit "1".
PROBABILITY = codes.DCM.Probability  # DCM 122157
UNIT_ONE = PydicomCode("1", "UCUM", "no units")
# TID 1500's report-level "Qualitative Evaluations" container (UMLS C0034375): the study summary.
QUALITATIVE_EVALUATIONS = PydicomCode("C0034375", "UMLS", "Qualitative Evaluations")
# The image(s) a summary line was read from (CID 7003).
BEST_ILLUSTRATION = codes.DCM.BestIllustrationOfFinding  # DCM 121080


def laterality_code(laterality: str | None) -> PydicomCode | None:
    """SCT Right / Left for DICOM's R / L (CID 244); None when the source does not say."""
    return {"R": RIGHT, "L": LEFT}.get((laterality or "").strip().upper())


def concept(code: Code | PydicomCode) -> hd.sr.CodedConcept:
    """A highdicom coded concept from a manifest code or a pydicom code."""
    if isinstance(code, PydicomCode):
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning,
                                  code.scheme_version)
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning, code.scheme_version)


def _schemes_in(dataset: Dataset) -> Iterator[str]:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _schemes_in(item)
        elif element.keyword == "CodingSchemeDesignator" and element.value:
            yield str(element.value)


def declare_private_schemes(dataset: Dataset, extra: Iterable[str] = ()) -> list[str]:
    """Add a Coding Scheme Identification item for every non-standard scheme the object uses.

    Returns the designators declared. Private schemes other than ours (a manifest may use its
    own) are declared with the model registry as the responsible organisation.
    """
    used = sorted(
        {s for s in (*_schemes_in(dataset), *extra) if s not in STANDARD_SCHEMES}
    )
    existing = {
        item.CodingSchemeDesignator
        for item in dataset.get("CodingSchemeIdentificationSequence", [])
    }
    items = list(dataset.get("CodingSchemeIdentificationSequence", []))
    for scheme in used:
        if scheme in existing:
            continue
        item = Dataset()
        item.CodingSchemeDesignator = scheme
        if scheme == PRIVATE_SCHEME:
            item.CodingSchemeName = PRIVATE_SCHEME_NAME
            item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANISATION
        else:
            item.CodingSchemeName = f"{scheme} (private, from a model manifest)"
            item.CodingSchemeResponsibleOrganization = "model registry of this dicomnode"
        items.append(item)
    if items:
        dataset.CodingSchemeIdentificationSequence = items
    return used


def unit_label(ucum_code: str) -> str:
    """A UCUM code as people read it beside a number: no "1", no annotation braces ({px} -> px)."""
    return "" if ucum_code == "1" else ucum_code.replace("{", "").replace("}", "")


# A classifier whose concept is Laterality and whose answer is Right / Left tells the eye from the
# image; the node uses it where the header has no laterality.
LATERALITY_CONCEPT = ("SCT", "272741003")
_SIDES = {("SCT", "24028007"): "R", ("SCT", "7771000"): "L"}


def side_of(answer_scheme: str, answer_value: str) -> str | None:
    """"R" / "L" for the SCT Right / Left codes, else None."""
    return _SIDES.get((answer_scheme, answer_value))


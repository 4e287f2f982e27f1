"""`summary: worst` on a probabilities output: accepted on the DR contracts, refused with the
output's name where the study summary could not be built from it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from dicomnode.registry import Manifest
from dicomnode.registry.manifest import ProbabilitiesOutput
from tests.support.grading_models import dme_manifest, dr_grade_manifest
from tests.support.onnx_models import classifier_manifest


def test_grading_contracts_declare_the_summary() -> None:
    manifest = Manifest.model_validate(dr_grade_manifest())
    grade, referable = manifest.outputs
    assert isinstance(grade, ProbabilitiesOutput) and grade.summary == "worst"
    assert [c.label for c in grade.classes][-1] == "proliferative"  # best to worst
    assert isinstance(referable, ProbabilitiesOutput) and referable.summary == "worst"
    assert Manifest.model_validate(dme_manifest()).outputs[0].kind == "probabilities"
    # Without the key nothing feeds the summary (the default).
    plain = Manifest.model_validate(classifier_manifest(gate=False)).outputs[0]
    assert isinstance(plain, ProbabilitiesOutput) and plain.summary is None


def _edit(change: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    manifest = classifier_manifest("q", gate=True)
    manifest["outputs"][0].update(change)
    for key in drop:
        manifest["outputs"][0].pop(key)
    return manifest


@pytest.mark.parametrize(("manifest", "message"), [
    (_edit({"summary": "best"}), "Input should be 'worst'"),
    (_edit({"summary": "worst"}),
     "output 'probabilities': a gate cannot feed the study summary"),
    (_edit({"summary": "worst"}, drop=("gate", "concept")),
     "output 'probabilities': 'summary' needs a 'concept'"),
    (_edit({"summary": "worst", "classes": [
        {"label": "a", "code": {"scheme": "SCT", "value": "1", "meaning": "A"}},
        {"label": "b", "code": {"scheme": "SCT", "value": "1", "meaning": "B"}}]},
        drop=("gate", "threshold", "positive")),
     "each class needs a different code"),
])
def test_summary_refusals_name_the_output(manifest: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate(manifest)

"""Manifest schema: what a single manifest may say, and the precise refusals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from dicomnode.registry import Manifest
from dicomnode.registry.manifest import MaskOutput, ProbabilitiesOutput, UpstreamInput
from tests.support.onnx_models import (
    classifier_manifest,
    measurement_manifest,
    segmenter_manifest,
)


def test_helpers_make_valid_manifests() -> None:
    seg = Manifest.model_validate(segmenter_manifest())
    assert isinstance(seg.outputs[0], MaskOutput)
    quality = Manifest.model_validate(classifier_manifest())
    (gate,) = quality.gates
    assert isinstance(gate, ProbabilitiesOutput) and gate.positive_label == "gradable"
    frac = Manifest.model_validate(
        measurement_manifest(source=["a-seg.mask", "b-seg.vessel.mask"])
    )
    (spec,) = frac.upstream_inputs
    assert isinstance(spec, UpstreamInput)
    assert [str(r) for r in spec.sources] == ["a-seg.mask", "b-seg.vessel.mask"]
    assert spec.sources[1].output == "vessel.mask"  # ids have no dots; the rest is the output
    assert frac.dependency_ids() == {"a-seg", "b-seg"}
    dumped = frac.model_dump(mode="json", by_alias=True)
    assert dumped["inputs"][0]["from"] == ["a-seg.mask", "b-seg.vessel.mask"]
    assert Manifest.model_validate(dumped) == frac  # dumps validate again unchanged


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("base", "edit", "message"),
    [
        (segmenter_manifest, _set(["id"], "Green_Seg"), "is not a model id"),
        (segmenter_manifest, _set(["version"], "v1"), "is not a version such as 1.0.0"),
        (segmenter_manifest, _set(["requires"], ["green-quality@1.0.0"]),
         "a version cannot be named here"),
        (segmenter_manifest, _set(["conflicts"], ["green-seg"]),
         "cannot require or conflict with itself"),
        (segmenter_manifest, _set(["modalities"], ["fundus photo"]), "not DICOM modality codes"),
        (segmenter_manifest, _set(["outputs", 0, "segment", "category", "meaning"], ""),
         "must not be blank"),
        (segmenter_manifest, _set(["outputs", 0, "segment", "category", "scheme"],
                                  "A-VERY-LONG-SCHEME-NAME"), "at most 16 characters"),
        (segmenter_manifest, _set(["outputs", 0, "threshold"], 1.5), "less than or equal to 1"),
        (segmenter_manifest, _set(["inputs", 0, "normalisation", "mean"], [0.1, 0.2]),
         "normalisation.mean has 2 values; colour RGB needs 1 or 3"),
        (segmenter_manifest, _set(["inputs", 0, "normalisation", "std"], [0.0]),
         "divide by zero"),
        (segmenter_manifest, _set(["inputs", 0, "layout"], "CHWN"), "'NCHW' or 'NHWC'"),
        (segmenter_manifest, _set(["outputs", 0, "kind"], "heatmap"), "does not match any"),
        (classifier_manifest, _set(["outputs", 0, "gate", "ineligible"], ["blurred"]),
         "gate names unknown class labels ['blurred']"),
        (classifier_manifest, _set(["outputs", 0, "positive"], "excellent"),
         "positive class 'excellent' is not one of"),
        (measurement_manifest, _set(["outputs", 0, "unit"], {"code": "square mm",
                                                            "meaning": "x"}),
         "a UCUM code has no spaces"),
        (measurement_manifest, _set(["outputs", 0, "unit"], {"code": "", "meaning": "x"}),
         "must not be blank"),
        (measurement_manifest, _set(["inputs", 0, "from"], "green-seg"),
         "is not '<model-id>.<output-name>'"),
        (measurement_manifest, _set(["inputs", 0, "from"], []), "at least one"),
        (measurement_manifest, _set(["inputs", 0, "from"], ["a.x", "a.y"]),
         "must name different models"),
        (measurement_manifest, _set(["inputs", 0, "from"], "mask-fraction.fraction"),
         "takes its own output"),
        (measurement_manifest, _set(["metrics"], [{"dataset": "x", "split": "test"}]),
         "Field required"),
    ],
)
def test_refusals(base: Callable[[], dict[str, Any]], edit: Any, message: str) -> None:
    manifest = base()
    edit(manifest)
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate(manifest)
    assert message in str(info.value)


def test_three_class_threshold_needs_a_positive_class() -> None:
    manifest = classifier_manifest(gate=False)
    out = manifest["outputs"][0]
    out["classes"].append({"label": "maybe", "code": {"scheme": "99X", "value": "M",
                                                      "meaning": "Maybe"}})
    del out["positive"]
    with pytest.raises(ValidationError, match="needs 'positive'"):
        Manifest.model_validate(manifest)

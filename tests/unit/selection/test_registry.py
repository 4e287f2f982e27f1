"""Registry loading: good models load, each kind of bad model is left out with id, file, reason."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from dicomnode.errors import RegistryLookupError
from dicomnode.registry import load_registry
from dicomnode.registry.version import sort_versions
from tests.support.onnx_models import (
    RegistryWriter,
    classifier_manifest,
    green_threshold_segmenter,
    mask_fraction_measurement,
    mean_colour_classifier,
    measurement_manifest,
    segmenter_manifest,
)


def test_example_registry_loads_every_model(registry_dir: Path) -> None:
    registry = load_registry(registry_dir)
    assert registry.left_out == ()
    assert registry.ids() == [
        "green-quality", "green-seg", "green-seg-alt", "mask-centre", "mask-fraction"
    ]
    assert registry.versions("green-seg") == ["1.0.0", "1.1.0"]
    assert registry.get("green-seg").version == "1.1.0"  # latest
    assert registry.get("green-seg", "1.0.0").version == "1.0.0"
    assert registry.lookup("green-seg@latest").version == "1.1.0"
    entry = registry.get("mask-fraction")
    assert entry.onnx_path == registry_dir / "mask-fraction" / "1.0.0" / "model.onnx"


def test_version_ordering_is_numeric_and_puts_prereleases_first() -> None:
    assert sort_versions(["1.10.0", "1.2.0", "1.2.0-rc.1", "0.9", "2"]) == [
        "0.9", "1.2.0-rc.1", "1.2.0", "1.10.0", "2"
    ]


def test_lookup_errors_are_precise(registry: Any) -> None:
    with pytest.raises(RegistryLookupError, match=r"no model 'nope' in the registry"):
        registry.get("nope")
    missing = r"has no version 9.9.9 \(versions: 1.0.0, 1.1.0\)"
    with pytest.raises(RegistryLookupError, match=missing):
        registry.lookup("green-seg@9.9.9")


def test_missing_registry_folder_is_empty_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        registry = load_registry(tmp_path / "absent")
    assert len(registry) == 0 and registry.left_out == ()
    assert "does not exist" in caplog.text


def _one_left_out(writer: RegistryWriter) -> Any:
    registry = load_registry(writer.root)
    assert len(registry.left_out) >= 1, "expected a model to be left out"
    return registry


@pytest.mark.parametrize(
    ("manifest", "model", "reason"),
    [
        (segmenter_manifest(), b"not an onnx file", r"ONNX file model.onnx does not load"),
        (segmenter_manifest(), green_threshold_segmenter(input_name="pixels"),
         r"input 'image' is not a graph input \(graph inputs: \['pixels'\]\)"),
        (segmenter_manifest(), green_threshold_segmenter(output_name="seg"),
         r"output 'mask' is not a graph output"),
        (segmenter_manifest(size=(64, 64)), green_threshold_segmenter(size=(32, 32)),
         r"input 'image' has H=32 in the graph; the manifest says 64"),
        (segmenter_manifest(), green_threshold_segmenter(batch=1),
         r"fixed batch of 1 in the graph; the manifest says 'dynamic'"),
        (classifier_manifest(), mean_colour_classifier(classes=3),
         r"output 'probabilities' has 3 classes in the graph, 2 in the manifest"),
        (segmenter_manifest(), mean_colour_classifier(output_name="mask"),
         r"output 'mask' has rank 2; a mask is \[N,1,H,W\] or \[N,H,W\]"),
    ],
    ids=["not-onnx", "input-name", "output-name", "size", "batch", "classes", "mask-rank"],
)
def test_graph_mismatch_is_left_out_with_reason(
    writer: RegistryWriter, manifest: dict[str, Any], model: Any, reason: str
) -> None:
    writer.add(manifest, model)
    writer.add(classifier_manifest("other-model"))  # a good one keeps loading
    registry = _one_left_out(writer)
    (lo,) = registry.left_out
    assert lo.id == manifest["id"] and lo.version == "1.0.0"
    assert lo.file is not None and lo.file.name == "model.onnx"
    assert re.search(reason, lo.reason), lo.reason
    assert registry.ids() == ["other-model"]


def test_dtype_mismatch(writer: RegistryWriter) -> None:
    manifest = measurement_manifest(source="green-seg.mask")
    manifest["inputs"][0]["dtype"] = "uint8"
    writer.add(segmenter_manifest())
    writer.add(manifest, mask_fraction_measurement())
    (lo,) = _one_left_out(writer).left_out
    assert "input 'mask' is float32 in the graph, uint8 in the manifest" in lo.reason


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.update(colour="purple"), "field 'colour': Extra inputs are not permitted"),
        (lambda m: m.update(version="latest"), "'latest' is reserved"),
        (lambda m: m["outputs"][0]["segment"]["type"].update(scheme=" "), "must not be blank"),
        (lambda m: m["provenance"].pop("licence"), "field 'provenance.licence': Field required"),
        (lambda m: m.update(task="painting"), "field 'task'"),
    ],
    ids=["unknown-key", "latest", "blank-code", "no-licence", "bad-task"],
)
def test_invalid_manifest_is_left_out(writer: RegistryWriter, edit: Any, reason: str) -> None:
    manifest = segmenter_manifest()
    writer.add(manifest)
    edit(manifest)
    path = writer.add(manifest, folder=("green-seg", "1.0.0")) / "manifest.yaml"
    (lo,) = _one_left_out(writer).left_out
    assert lo.file == path
    assert reason in lo.reason, lo.reason


def test_bad_yaml_names_the_line(writer: RegistryWriter) -> None:
    directory = writer.add(segmenter_manifest())
    (directory / "manifest.yaml").write_text("id: green-seg\nversion: [1.0\n", encoding="utf-8")
    (lo,) = _one_left_out(writer).left_out
    assert "not valid YAML at line" in lo.reason


def test_folder_must_match_id_and_version(writer: RegistryWriter) -> None:
    writer.add(segmenter_manifest(), folder=("green-seg", "2.0.0"))
    (lo,) = _one_left_out(writer).left_out
    assert "manifest says green-seg@1.0.0 but the folder is green-seg/2.0.0" in lo.reason


def test_missing_card_and_missing_manifest(writer: RegistryWriter) -> None:
    writer.add(segmenter_manifest(), card=None)
    (writer.root / "empty-model" / "1.0.0").mkdir(parents=True)
    registry = load_registry(writer.root)
    reasons = {lo.id: lo.reason for lo in registry.left_out}
    assert reasons == {
        "empty-model": "manifest.yaml is missing",
        "green-seg": "model card CARD.md is missing",
    }


def test_unknown_references_and_cascade(writer: RegistryWriter) -> None:
    writer.add(classifier_manifest("quality"), b"broken")
    writer.add(segmenter_manifest("seg", requires=["quality"]))
    writer.add(measurement_manifest("frac", source="seg.mask"))
    writer.add(segmenter_manifest("typo", requires=["qualty"]))
    writer.add(measurement_manifest("no-output", source="frac.nothing"))
    writer.add(segmenter_manifest("fine"))
    registry = load_registry(writer.root)
    reasons = {lo.id: lo.reason for lo in registry.left_out}
    assert registry.ids() == ["fine"]
    assert reasons["quality"].startswith("ONNX file model.onnx does not load")
    assert reasons["seg"].startswith("requires quality was left out (quality@1.0.0: ONNX file")
    assert reasons["frac"].startswith("input 'mask' has no source: seg was left out")
    assert reasons["typo"] == "requires unknown model 'qualty'"
    # Its own defect is reported even though its source is also left out later.
    assert "but frac@1.0.0 has no output 'nothing' (outputs: fraction)" in reasons["no-output"]


def test_output_missing_on_upstream(writer: RegistryWriter) -> None:
    writer.add(segmenter_manifest("seg"))
    writer.add(measurement_manifest("frac", source="seg.vessels"))
    (lo,) = _one_left_out(writer).left_out
    assert lo.reason == (
        "input 'mask' takes seg.vessels, but seg@1.0.0 has no output 'vessels' (outputs: mask)"
    )


def test_one_bad_version_keeps_the_other(writer: RegistryWriter) -> None:
    writer.add(segmenter_manifest("seg", "1.0.0"))
    writer.add(segmenter_manifest("seg", "2.0.0"), b"junk")
    registry = load_registry(writer.root)
    assert registry.versions("seg") == ["1.0.0"]
    assert registry.get("seg").version == "1.0.0"
    with pytest.raises(RegistryLookupError, match=r"'seg@2.0.0' was left out: ONNX file"):
        registry.get("seg", "2.0.0")


def test_onnx_runtime_fallback_reads_the_same_signature(
    registry_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomnode.registry.onnx_check import read_signature

    paths = sorted(registry_dir.glob("*/*/model.onnx"))
    with_onnx = [read_signature(p) for p in paths]
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # import onnx -> ImportError
    without_onnx = [read_signature(p) for p in paths]
    assert without_onnx == with_onnx
    assert load_registry(registry_dir).left_out == ()

"""Resolver examples on the example registry: stages, reasons, alternatives, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomnode.errors import ResolutionError
from dicomnode.graph import ResolvedGraph, Selection, resolve, selectable
from dicomnode.registry import Registry, load_registry
from tests.support.onnx_models import (
    RegistryWriter,
    classifier_manifest,
    measurement_manifest,
    segmenter_manifest,
)


def test_requirements_are_added_with_reasons_and_staged(registry: Registry) -> None:
    graph = resolve(Selection.of(["mask-fraction", "mask-centre"]), registry)
    assert graph.stages == (("green-quality",), ("green-seg",), ("mask-centre", "mask-fraction"))
    assert graph.added == {
        "green-quality": "required by green-seg",
        "green-seg": "required by mask-centre, mask-fraction",
    }
    assert graph.models["green-seg"] == "1.1.0"  # latest when not pinned
    assert graph.inputs == {
        "mask-centre": {"mask": "green-seg.mask"},
        "mask-fraction": {"mask": "green-seg.mask"},
    }
    assert graph.dependencies("mask-fraction") == ["green-seg"]
    assert graph.transitive_dependants("green-quality") == [
        "green-seg", "mask-centre", "mask-fraction"
    ]


def test_pinned_version_is_used(registry: Registry) -> None:
    graph = resolve(Selection.of(["green-seg@1.0.0", "mask-fraction"]), registry)
    assert graph.models["green-seg"] == "1.0.0"


def test_alternative_source_follows_the_selection(registry: Registry) -> None:
    graph = resolve(Selection.of(["mask-fraction", "green-seg-alt"]), registry)
    assert graph.inputs["mask-fraction"] == {"mask": "green-seg-alt.mask"}
    assert "green-seg" not in graph.models
    default = resolve(Selection.of(["mask-fraction"]), registry)
    assert default.inputs["mask-fraction"] == {"mask": "green-seg.mask"}


def test_default_alternative_avoids_a_conflict(registry_dir: Path) -> None:
    RegistryWriter(registry_dir).add(
        classifier_manifest("no-green-seg", gate=False, conflicts=["green-seg"])
    )
    graph = resolve(Selection.of(["mask-fraction", "no-green-seg"]), load_registry(registry_dir))
    assert graph.inputs["mask-fraction"] == {"mask": "green-seg-alt.mask"}


def test_switching_off_drops_dependants_and_uses_the_other_alternative(
    registry: Registry,
) -> None:
    graph = resolve(
        Selection.of(["mask-fraction", "mask-centre"], without=["green-seg"]), registry
    )
    assert graph.removed == {
        "green-seg": "switched off",
        "mask-centre": "needs green-seg, which was switched off",
    }
    assert graph.inputs["mask-fraction"] == {"mask": "green-seg-alt.mask"}
    assert graph.added["green-seg-alt"] == "required by mask-fraction"


def test_conflict_names_both_models_and_the_rule(registry: Registry) -> None:
    with pytest.raises(ResolutionError) as info:
        resolve(Selection.of(["mask-centre", "green-seg-alt"]), registry)
    assert info.value.kind == "conflict"
    assert str(info.value) == (
        "green-seg (required by mask-centre) conflicts with green-seg-alt (selected): "
        "green-seg's manifest lists green-seg-alt under conflicts; switch one of them off"
    )


def test_wrong_modality(registry: Registry) -> None:
    with pytest.raises(ResolutionError, match=r"'mask-centre' \(selected\) does not accept "
                       r"modality XC; it accepts OP") as info:
        resolve(Selection.of(["mask-centre"], modality="xc"), registry)
    assert info.value.kind == "modality"


@pytest.mark.parametrize(
    ("selection", "kind", "message"),
    [
        (Selection.of(["nope"]), "unknown", "unknown model 'nope' (selection)"),
        (Selection.of(["green-seg"], with_models=["nope"]), "unknown", "unknown model 'nope'"),
        (Selection.of(["green-seg@3.0.0"]), "version",
         "model 'green-seg' has no version 3.0.0; versions: 1.0.0, 1.1.0"),
        (Selection.of(["green-seg@1.0.0"], with_models=["green-seg@1.1.0"]), "version",
         "selected at two versions (1.0.0 and 1.1.0)"),
        (Selection.of(["green-seg"], with_models=["mask-centre"], without=["mask-centre"]),
         "selection", "both switched on (--with) and off (--without)"),
        (Selection.of(["green-seg"], without=["green-seg@1.0.0"]), "selection",
         "switch a model off by id"),
    ],
)
def test_refusals(registry: Registry, selection: Selection, kind: str, message: str) -> None:
    with pytest.raises(ResolutionError) as info:
        resolve(selection, registry)
    assert info.value.kind == kind
    assert message in str(info.value)


def test_cycle_is_named(writer: RegistryWriter) -> None:
    writer.add(segmenter_manifest("aa", requires=["bb"]))
    writer.add(segmenter_manifest("bb", requires=["cc"]))
    writer.add(segmenter_manifest("cc", requires=["aa"]))
    with pytest.raises(ResolutionError) as info:
        resolve(Selection.of(["bb"]), load_registry(writer.root))
    assert info.value.kind == "cycle"
    assert "dependency cycle: aa -> bb -> cc -> aa" in str(info.value)


def test_left_out_model_is_refused_with_the_registry_reason(writer: RegistryWriter) -> None:
    writer.add(classifier_manifest("quality"), b"junk")
    writer.add(segmenter_manifest("seg"))
    registry = load_registry(writer.root)
    with pytest.raises(ResolutionError, match=r"'quality' was left out by the registry: ONNX"):
        resolve(Selection.of(["seg", "quality"]), registry)
    assert selectable(Selection.of(["seg"]), registry)["quality"].reason.startswith(
        "left out: ONNX file"
    )


def test_pinned_source_without_the_output_is_refused(writer: RegistryWriter) -> None:
    writer.add(segmenter_manifest("seg", "1.0.0", output="old_mask"))
    writer.add(segmenter_manifest("seg", "2.0.0", output="mask"))
    writer.add(measurement_manifest("frac", source="seg.mask"))
    registry = load_registry(writer.root)
    assert resolve(Selection.of(["frac"]), registry).models["seg"] == "2.0.0"
    with pytest.raises(ResolutionError, match=r"seg@1.0.0 has no output 'mask'") as info:
        resolve(Selection.of(["frac", "seg@1.0.0"]), registry)
    assert info.value.kind == "input"


def test_graph_round_trips_through_json(registry: Registry) -> None:
    graph = resolve(
        Selection.of(["mask-fraction"], with_models=["mask-centre"], modality="OP",
                      preset="demo"),
        registry,
    )
    again = ResolvedGraph.from_dict(json.loads(json.dumps(graph.to_dict())))
    assert again == graph
    assert again.preset == "demo" and again.modality == "OP"


def test_selectable_explains_every_model(registry: Registry) -> None:
    choices = selectable(Selection.of(["mask-centre"]), registry)
    assert {k: (v.ok, v.state, v.reason) for k, v in choices.items()} == {
        "green-quality": (True, "required", "required by green-seg"),
        "green-seg": (True, "required", "required by mask-centre"),
        "green-seg-alt": (False, "unavailable", "conflicts with green-seg"),
        "mask-centre": (True, "selected", "selected"),
        "mask-fraction": (True, "available", "can be added"),
    }
    xc = selectable(Selection.of(["mask-fraction"], modality="XC"), registry)
    assert xc["mask-centre"].reason == "needs modality OP"
    assert not xc["mask-centre"].ok

"""`fitted_on`: a consumer fitted on one version of its source's outputs is fed that version.

Learned heads (dr-grade, dme-risk) read lesion-seg's raw maps; a newer lesion-seg's maps would
give wrong answers without any error, so the resolver must bring the fitted version in or
refuse the graph.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from dicomnode.errors import ResolutionError
from dicomnode.graph import Selection, resolve
from dicomnode.registry import Manifest, ModelEntry, Registry, build_registry
from tests.support.onnx_models import PROVENANCE, image_input

_OUT = {"kind": "measurement", "name": "out",
        "code": {"scheme": "99T", "value": "X", "meaning": "x"},
        "unit": {"code": "1", "meaning": "no units"}}


def _manifest(mid: str, version: str, inputs: list[dict[str, Any]]) -> Manifest:
    return Manifest.model_validate({
        "id": mid, "version": version, "name": mid, "task": "measurement",
        "modalities": ["OP"], "inputs": inputs, "outputs": [_OUT], "provenance": PROVENANCE,
    })


def _head(version: str, fitted: str | None) -> Manifest:
    spec: dict[str, Any] = {"name": "maps", "from": "seg.out"}
    if fitted is not None:
        spec["fitted_on"] = {"seg": fitted}
    return _manifest("head", version, [image_input(), spec])


def _registry(*extra: Manifest) -> Registry:
    entries = [_manifest("seg", "1.0.0", [image_input()]),
               _manifest("seg", "1.1.0", [image_input()]),
               _head("1.0.0", "1.0.0"), _head("2.0.0", "1.1.0"), *extra]
    return build_registry([ModelEntry(m) for m in entries])


def test_an_older_consumer_brings_the_source_version_it_was_fitted_on() -> None:
    graph = resolve(Selection.of(["head@1.0.0"]), _registry())
    assert graph.models == {"head": "1.0.0", "seg": "1.0.0"}


def test_the_latest_consumer_takes_the_latest_source_it_was_fitted_on() -> None:
    graph = resolve(Selection.of(["head"]), _registry())
    assert graph.models == {"head": "2.0.0", "seg": "1.1.0"}


def test_another_source_version_in_the_graph_is_refused_naming_both() -> None:
    with pytest.raises(ResolutionError) as caught:
        resolve(Selection.of(["head@1.0.0", "seg@1.1.0"]), _registry())
    message = str(caught.value)
    assert "fitted on seg@1.0.0" in message and "seg@1.1.0" in message


def test_without_fitted_on_the_latest_source_feeds_it() -> None:
    registry = build_registry([ModelEntry(m) for m in (
        _manifest("seg", "1.0.0", [image_input()]), _manifest("seg", "1.1.0", [image_input()]),
        _head("1.0.0", None))])
    assert resolve(Selection.of(["head"]), registry).models["seg"] == "1.1.0"


def test_fitted_on_must_name_one_of_the_inputs_sources() -> None:
    with pytest.raises(ValidationError, match="fitted_on names 'other'"):
        _manifest("head", "1.0.0", [image_input(),
                                    {"name": "maps", "from": "seg.out",
                                     "fitted_on": {"other": "1.0.0"}}])


def test_a_source_selected_without_a_version_is_held_at_the_fitted_one() -> None:
    # "seg" switched on unpinned beside head@1.0.0: the latest seg that fits is 1.0.0.
    graph = resolve(Selection.of(["head@1.0.0", "seg"]), _registry())
    assert graph.models == {"head": "1.0.0", "seg": "1.0.0"}


def test_consumers_fitted_on_different_versions_are_refused() -> None:
    other = _manifest("tail", "1.0.0", [image_input(), {"name": "maps", "from": "seg.out",
                                                        "fitted_on": {"seg": "1.1.0"}}])
    with pytest.raises(ResolutionError, match="fitted on seg@"):
        resolve(Selection.of(["head@1.0.0", "tail"]), _registry(other))

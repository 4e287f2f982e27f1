"""The examples in docs/registry-and-presets.md are valid and the graph shown is what resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from dicomnode.graph import Selection, resolve
from dicomnode.registry import Manifest, ModelEntry, build_registry
from dicomnode.routing import parse_preset

DOC = Path(__file__).resolve().parents[3] / "docs" / "registry-and-presets.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def _manifests() -> dict[str, dict[str, Any]]:
    found = {}
    for block in _blocks("yaml"):
        if block.startswith("# manifest:"):
            data = yaml.safe_load(block)
            found[data["id"]] = data
    return found


def test_manifest_examples_validate() -> None:
    manifests = _manifests()
    assert sorted(manifests) == ["fundus-quality", "vessel-metrics", "vessel-seg"]
    for data in manifests.values():
        Manifest.model_validate(data)


def test_preset_example_validates() -> None:
    (block,) = [b for b in _blocks("yaml") if b.startswith("# preset:")]
    preset = parse_preset(block, Path("example.yaml"), registry=None, destinations={"pacs"})
    assert preset.models == ["fundus-quality", "vessel-metrics", "disc-metrics@1.0.0"]


def test_graph_example_is_what_resolves() -> None:
    manifests = _manifests()
    classic = {**manifests["vessel-seg"], "id": "vessel-seg-classic", "conflicts": []}
    entries = [ModelEntry(Manifest.model_validate(m)) for m in [*manifests.values(), classic]]
    registry = build_registry(entries)
    assert registry.left_out == ()
    graph = resolve(
        Selection.of(["fundus-quality", "vessel-metrics"], modality="OP",
                     preset="diabetic-screening"),
        registry,
    )
    (shown,) = [json.loads(b) for b in _blocks("json")]
    assert graph.to_dict() == shown

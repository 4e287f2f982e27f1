"""Property tests with alternative `from:` sources and models switched off: invariants that
every resolved graph must hold, whatever the resolver chose."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnode.errors import ResolutionError
from dicomnode.graph import ResolvedGraph, Selection, resolve
from dicomnode.registry import Manifest, ModelEntry, Registry, build_registry
from tests.support.onnx_models import PROVENANCE, image_input

NAMES = ("ant", "bee", "cat", "dog", "eel", "fly", "gnu")


def _manifest(mid: str, requires: list[str], alternatives: list[list[str]],
              conflicts: list[str]) -> Manifest:
    inputs: list[dict[str, Any]] = [image_input()]
    inputs += [
        {"name": f"in{i}", "from": [f"{src}.out" for src in alts]}
        for i, alts in enumerate(alternatives)
    ]
    return Manifest.model_validate(
        {
            "id": mid, "version": "1.0.0", "name": mid, "task": "segmentation",
            "modalities": ["OP"], "inputs": inputs,
            "outputs": [{"kind": "measurement", "name": "out",
                         "code": {"scheme": "99T", "value": "X", "meaning": "x"},
                         "unit": {"code": "1", "meaning": "no units"}}],
            "requires": requires, "conflicts": conflicts, "provenance": PROVENANCE,
        }
    )


@st.composite
def scenario(draw: st.DrawFn) -> tuple[Registry, list[str], list[str]]:
    n = draw(st.integers(2, len(NAMES)))
    ids = list(draw(st.permutations(NAMES))[:n])
    entries = []
    for i, mid in enumerate(ids):
        earlier = ids[:i]
        requires: list[str] = []
        alternatives: list[list[str]] = []
        if earlier:
            requires = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=1))
            free = [x for x in earlier if x not in requires]
            if len(free) >= 2 and draw(st.booleans()):
                alternatives.append(
                    draw(st.lists(st.sampled_from(free), unique=True, min_size=2, max_size=3))
                )
        others = [x for x in ids if x != mid and x not in requires]
        conflicts = draw(st.lists(st.sampled_from(others), unique=True, max_size=1)) \
            if others and draw(st.integers(0, 3)) == 1 else []
        entries.append(ModelEntry(_manifest(mid, requires, alternatives, conflicts)))
    registry = build_registry(entries)
    selection = draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    without = draw(st.lists(st.sampled_from(ids), unique=True, max_size=2))
    return registry, selection, without


def _satisfiable(registry: Registry, mid: str, without: set[str], path: frozenset[str]) -> bool:
    """Naive: can mid run without the switched-off models, by some choice of sources?"""
    if mid in without or mid in path:
        return False
    manifest = registry.get(mid).manifest
    inner = path | {mid}
    return all(_satisfiable(registry, r, without, inner) for r in manifest.requires) and all(
        any(_satisfiable(registry, ref.model, without, inner) for ref in spec.sources)
        for spec in manifest.upstream_inputs
    )


def _check(registry: Registry, selection: list[str], without: list[str],
           graph: ResolvedGraph) -> None:
    present = set(graph.models)
    assert not present & set(without)
    assert set(graph.selected) <= set(selection) - set(without)
    for mid in set(selection) - set(without) - set(graph.selected):
        # Dropped only when it really cannot run without a switched-off model.
        assert graph.removed[mid].startswith("needs ")
        assert not _satisfiable(registry, mid, set(without), frozenset())
    for mid in graph.selected:
        assert _satisfiable(registry, mid, set(without), frozenset())
    needed_by_someone: set[str] = set()
    for mid in present:
        manifest = registry.get(mid).manifest
        assert set(manifest.requires) <= present
        needed_by_someone |= set(manifest.requires)
        for spec in manifest.upstream_inputs:
            listed = [r.model for r in spec.sources]
            held = [m for m in listed if m in present]
            assert held, f"{mid}.{spec.name} has no source in the graph"
            assert graph.inputs[mid][spec.name] == f"{held[0]}.out"  # first listed that is held
            needed_by_someone.add(held[0])
        for other in manifest.conflicts:
            assert other not in present
    assert present == set(graph.selected) | needed_by_someone  # nothing superfluous
    for edge in graph.edges:
        assert graph.stage_of(edge.source) < graph.stage_of(edge.target)
    for mid in present:
        deps = graph.dependencies(mid)
        assert graph.stage_of(mid) == (1 + max(graph.stage_of(d) for d in deps) if deps else 0)


@settings(max_examples=200, deadline=None)
@given(case=scenario(), data=st.data())
def test_alternatives_and_switching_off(
    case: tuple[Registry, list[str], list[str]], data: st.DataObject
) -> None:
    registry, selection, without = case
    try:
        graph = resolve(Selection.of(selection, without=without), registry)
    except ResolutionError as exc:
        assert exc.kind == "conflict", exc
        if exc.kind == "conflict":
            a, b = exc.models
            assert b in registry.get(a).manifest.conflicts or \
                a in registry.get(b).manifest.conflicts
        return
    _check(registry, selection, without, graph)
    again = resolve(
        Selection.of(data.draw(st.permutations(selection)),
                     without=data.draw(st.permutations(without))),
        registry,
    )
    assert again == graph

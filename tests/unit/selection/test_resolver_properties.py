"""Property tests: random registries with random requires, data inputs, conflicts, modalities
and left-out models, checked against a deliberately naive oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnode.errors import ResolutionError
from dicomnode.graph import ResolvedGraph, Selection, resolve, selectable
from dicomnode.registry import LeftOut, Manifest, ModelEntry, Registry, build_registry
from tests.support.onnx_models import PROVENANCE, image_input

MODALITIES = ("OP", "XC")
NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "fox", "golf", "hotel")


def _manifest(
    model_id: str, requires: list[str], data_from: list[str], conflicts: list[str],
    modalities: list[str],
) -> Manifest:
    inputs: list[dict[str, Any]] = [image_input()]
    inputs += [{"name": f"in_{src}", "from": f"{src}.out"} for src in data_from]
    return Manifest.model_validate(
        {
            "id": model_id,
            "version": "1.0.0",
            "name": model_id,
            "task": "segmentation",
            "modalities": modalities,
            "inputs": inputs,
            "outputs": [
                {
                    "kind": "measurement",
                    "name": "out",
                    "code": {"scheme": "99T", "value": "X", "meaning": "x"},
                    "unit": {"code": "1", "meaning": "no units"},
                }
            ],
            "requires": requires,
            "conflicts": conflicts,
            "provenance": PROVENANCE,
        }
    )


@dataclass
class World:
    ids: list[str]
    deps: dict[str, set[str]]  # requires + from sources
    conflicts: set[frozenset[str]]
    modalities: dict[str, set[str]]
    broken: set[str]
    registry: Registry


@st.composite
def worlds(draw: st.DrawFn, *, acyclic: bool) -> World:
    n = draw(st.integers(1, len(NAMES)))
    # Random names in random order, so the dependency order is unrelated to sorting by id.
    ids = draw(st.permutations(NAMES))[:n]
    deps: dict[str, set[str]] = {}
    requires: dict[str, list[str]] = {}
    data_from: dict[str, list[str]] = {}
    for i, mid in enumerate(ids):
        pool = [x for j, x in enumerate(ids) if (j < i if acyclic else x != mid)]
        chosen = draw(st.lists(st.sampled_from(pool), unique=True, max_size=3)) if pool else []
        split = draw(st.integers(0, len(chosen)))
        requires[mid], data_from[mid] = chosen[:split], chosen[split:]
        deps[mid] = set(chosen)
    pairs = [frozenset((a, b)) for i, a in enumerate(ids) for b in ids[i + 1:]]
    conflicts = set(draw(st.lists(st.sampled_from(pairs), unique=True, max_size=4))) if pairs \
        else set()
    modalities = {
        mid: set(draw(st.lists(st.sampled_from(MODALITIES), min_size=1, unique=True)))
        for mid in ids
    }
    # Left-out models cascade to their dependants; keep them rare so other outcomes get tested.
    broken = set(ids[:1]) if draw(st.integers(0, 9)) == 7 else set()
    candidates, left_out = [], []
    for mid in ids:
        own_conflicts = sorted(
            next(iter(p - {mid})) for p in conflicts if mid in p
            # declare each conflict on one side only, at random: either side must count
            and draw(st.booleans())
        )
        declared = [c for c in own_conflicts if c not in deps[mid]]
        manifest = _manifest(mid, requires[mid], data_from[mid], declared, sorted(modalities[mid]))
        if mid in broken:
            left_out.append(LeftOut(mid, "1.0.0", None, "broken on purpose"))
        else:
            candidates.append(ModelEntry(manifest))
    # Conflicts that were declared on neither side, or dropped because also a dependency, do
    # not exist: recompute the true set from the manifests actually built.
    registry = build_registry(candidates, left_out)
    true_conflicts = set()
    for entry in candidates:
        for other in entry.manifest.conflicts:
            true_conflicts.add(frozenset((entry.id, other)))
    return World(list(ids), deps, true_conflicts, modalities, broken, registry)


def _accepted(world: World) -> set[str]:
    accepted = set(world.ids) - world.broken
    changed = True
    while changed:
        changed = False
        for mid in sorted(accepted):
            if not world.deps[mid] <= accepted:
                accepted.discard(mid)
                changed = True
    return accepted


def _closure(world: World, selected: set[str]) -> set[str]:
    seen, todo = set(), list(selected)
    while todo:
        mid = todo.pop()
        if mid not in seen:
            seen.add(mid)
            todo.extend(world.deps[mid])
    return seen


def _has_cycle(world: World, nodes: set[str]) -> bool:
    remaining = set(nodes)
    while remaining:  # Kahn: peel nodes with no remaining dependencies
        free = {m for m in remaining if not (world.deps[m] & remaining)}
        if not free:
            return True
        remaining -= free
    return False


def _expected_failure(world: World, selected: set[str], modality: str | None) -> str | None:
    if not selected <= _accepted(world):
        return "left_out"
    closure = _closure(world, selected)
    if modality and any(modality not in world.modalities[m] for m in closure):
        return "modality"
    if _has_cycle(world, closure):
        return "cycle"
    if any(pair <= closure for pair in world.conflicts):
        return "conflict"
    return None


def _check_graph(world: World, selected: set[str], graph: ResolvedGraph) -> None:
    closure = _closure(world, selected)
    assert set(graph.models) == closure
    assert set(graph.selected) == selected
    assert set(graph.added) == closure - selected
    for mid, reason in graph.added.items():
        requirers = {m for m in closure if mid in world.deps[m]}
        assert reason.startswith("required by ")
        assert set(reason[len("required by "):].split(", ")) == requirers
    for mid in closure:  # transitive requirements held
        assert world.deps[mid] <= set(graph.models)
    for pair in world.conflicts:  # no conflicting pair
        assert not pair <= set(graph.models)
    for edge in graph.edges:  # edges go from an earlier stage to a later one
        assert graph.stage_of(edge.source) < graph.stage_of(edge.target)
    assert {(e.source, e.target) for e in graph.edges} == {
        (d, m) for m in closure for d in world.deps[m]
    }
    for mid in closure:  # each model in its earliest possible stage
        deps = world.deps[mid]
        expected = 0 if not deps else 1 + max(graph.stage_of(d) for d in deps)
        assert graph.stage_of(mid) == expected
    assert all(list(stage) == sorted(stage) for stage in graph.stages)
    assert ResolvedGraph.from_dict(graph.to_dict()) == graph


@st.composite
def cases(draw: st.DrawFn, acyclic: bool) -> tuple[World, list[str], str | None]:
    world = draw(worlds(acyclic=acyclic))
    selection = draw(st.lists(st.sampled_from(world.ids), min_size=1, unique=True))
    modality = draw(st.sampled_from([None, None, *MODALITIES]))
    return world, selection, modality


def _run(world: World, selection: list[str], modality: str | None, data: st.DataObject) -> None:
    expected = _expected_failure(world, set(selection), modality)
    try:
        graph = resolve(Selection.of(selection, modality=modality), world.registry)
    except ResolutionError as exc:
        assert expected == exc.kind, f"refused as {exc.kind} ({exc}); oracle: {expected}"
        closure = _closure(world, set(selection))
        if exc.kind == "conflict":
            assert frozenset(exc.models) in world.conflicts
            assert set(exc.models) <= closure
            assert all(m in str(exc) for m in exc.models)
        elif exc.kind == "cycle":
            cycle = list(exc.models)
            assert set(cycle) <= closure
            for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
                assert b in world.deps[a]
            assert " -> ".join([*cycle, cycle[0]]) in str(exc)
        elif exc.kind == "modality":
            assert modality not in world.modalities[exc.models[0]]
            assert exc.models[0] in closure
        elif exc.kind == "left_out":
            assert exc.models[0] in set(selection) - _accepted(world)
        return
    assert expected is None, f"resolved, but the oracle expected {expected}"
    _check_graph(world, set(selection), graph)
    shuffled = data.draw(st.permutations(selection))
    again = resolve(Selection.of(shuffled, modality=modality), world.registry)
    assert again.to_dict() == graph.to_dict()  # independent of input order


@settings(max_examples=200, deadline=None)
@given(case=cases(acyclic=True), data=st.data())
def test_acyclic_registries(case: tuple[World, list[str], str | None], data: st.DataObject) -> None:
    _run(*case, data)


@settings(max_examples=150, deadline=None)
@given(case=cases(acyclic=False), data=st.data())
def test_registries_with_cycles(
    case: tuple[World, list[str], str | None], data: st.DataObject
) -> None:
    _run(*case, data)


@settings(max_examples=60, deadline=None)
@given(case=cases(acyclic=True))
def test_selectable_agrees_with_resolve(case: tuple[World, list[str], str | None]) -> None:
    world, selection, modality = case
    base = Selection.of(selection, modality=modality)
    try:
        graph = resolve(base, world.registry)
    except ResolutionError:
        return
    choices = selectable(base, world.registry)
    assert set(choices) == set(world.ids)
    for mid, choice in choices.items():
        if mid in world.broken or mid not in _accepted(world):
            assert not choice.ok and choice.reason.startswith("left out")
        elif mid in graph.selected:
            assert choice.state == "selected"
        elif mid in graph.added:
            assert choice.state == "required" and choice.reason.startswith("required by")
        else:
            expected = _expected_failure(world, {*selection, mid}, modality)
            assert choice.ok == (expected is None), (mid, choice, expected)
            if expected == "conflict":
                assert "conflicts with" in choice.reason
            if expected == "modality":
                assert "needs modality" in choice.reason

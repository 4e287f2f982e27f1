"""Selection -> resolved graph. The one implementation used by presets, console, API and CLI.

Steps (DESIGN.md "Presets, selection and the resolved graph"):
1. the preset's models plus those switched on, minus those switched off (and whatever needs
   a switched-off model);
2. every required model, transitively, remembering who required it; for an input with
   alternative sources, the first alternative the graph already holds, else the first available;
3. refuse models the registry left out or does not know, modality mismatches, inputs whose
   source lacks the output, cycles, conflicts;
4. stages: each model in the earliest stage its dependencies allow.
Everything iterates in sorted order so the result depends only on the sets given.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from dicomnode.errors import RegistryLookupError, ResolutionError
from dicomnode.graph.model import Edge, ResolvedGraph
from dicomnode.graph.selection import Selection
from dicomnode.registry.manifest import (
    Manifest,
    OutputRef,
    UpstreamInput,
    input_source_problem,
    input_version_problem,
)
from dicomnode.registry.registry import ModelEntry, Registry, parse_model_ref

logger = logging.getLogger(__name__)


def resolve(selection: Selection, registry: Registry) -> ResolvedGraph:
    """Resolve a selection against a registry, or raise a precise ResolutionError."""
    explicit, pins = _explicit(selection, registry)
    excluded = {_parse(ref, "--without")[0] for ref in selection.without}
    removed = {m: "switched off" for m in sorted(excluded)}

    # Switching a model off also drops what cannot run without it; repeat, because dropping
    # one model changes which alternatives the others use.
    while True:
        chosen, defaults = _close_fitted(explicit, pins, excluded, registry)
        stranded = sorted(set(chosen) & excluded)
        if not stranded:
            break
        dropped = False
        for model_id in sorted(explicit):
            alone, _ = _close_fitted({model_id}, pins, excluded, registry)
            needed = sorted(set(alone) & excluded)
            if needed:
                explicit.discard(model_id)
                removed[model_id] = f"needs {needed[0]}, which was switched off"
                dropped = True
        if not dropped:  # pragma: no cover - the union of closures contains every requirement
            raise ResolutionError(
                f"cannot switch off {', '.join(stranded)}: still required",
                kind="selection",
                models=tuple(stranded),
            )

    bindings = _bind_inputs(chosen)
    _check_modality(chosen, selection.modality, explicit)
    _check_inputs(chosen, bindings)
    edges = _edges(chosen, bindings)
    _check_cycles(chosen, edges)
    _check_conflicts(chosen, explicit, edges)
    stages = _stages(chosen, edges)

    requirers: dict[str, set[str]] = {}
    for edge in edges:
        requirers.setdefault(edge.source, set()).add(edge.target)
    added = {}
    for model_id in sorted(set(chosen) - explicit):
        who = sorted(requirers.get(model_id, set()))
        added[model_id] = (
            f"required by {', '.join(who)}" if who else defaults.get(model_id, "required")
        )
    graph = ResolvedGraph(
        stages=stages,
        models={m: chosen[m].version for m in sorted(chosen)},
        selected=tuple(sorted(explicit)),
        added=added,
        removed=dict(sorted(removed.items())),
        edges=tuple(sorted(edges)),
        inputs={
            consumer: {name: str(ref) for name, ref in sorted(inputs.items())}
            for consumer, inputs in sorted(bindings.items())
            if inputs
        },
        modality=selection.modality,
        preset=selection.preset,
    )
    logger.debug("resolved %s -> %s", selection, graph.stages)
    return graph


# --- selection --------------------------------------------------------------------------------


def _parse(ref: str, where: str) -> tuple[str, str | None]:
    try:
        model_id, version = parse_model_ref(ref)
    except RegistryLookupError as exc:
        raise ResolutionError(f"{where}: {exc}", kind="selection") from exc
    if where == "--without" and version is not None:
        raise ResolutionError(
            f"--without {ref}: switch a model off by id, without a version",
            kind="selection",
            models=(model_id,),
        )
    return model_id, version


def _explicit(selection: Selection, registry: Registry) -> tuple[set[str], dict[str, str | None]]:
    known = set(registry.known_ids())
    pins: dict[str, str | None] = {}
    sources = [(ref, "selection") for ref in selection.models]
    sources += [(ref, "--with") for ref in selection.with_models]
    sources += [(ref, "--without") for ref in selection.without]
    for ref, where in sources:
        model_id, version = _parse(ref, where)
        if model_id not in known:
            raise ResolutionError(
                f"unknown model '{model_id}' ({where}); the registry has: "
                f"{', '.join(registry.ids()) or 'no models'}",
                kind="unknown",
                models=(model_id,),
                short="unknown model",
            )
        if where == "--without":
            continue
        previous = pins.get(model_id)
        if model_id in pins and version is not None and previous not in (None, version):
            raise ResolutionError(
                f"model '{model_id}' is selected at two versions ({previous} and {version}); "
                "pick one",
                kind="version",
                models=(model_id,),
            )
        pins[model_id] = version if version is not None else previous
    without = {_parse(ref, "--without")[0] for ref in selection.without}
    both = sorted(without & {parse_model_ref(r)[0] for r in selection.with_models})
    if both:
        raise ResolutionError(
            f"model '{both[0]}' is both switched on (--with) and off (--without)",
            kind="selection",
            models=(both[0],),
        )
    for model_id in sorted(pins):
        if model_id not in without:
            _entry(model_id, pins[model_id], registry, None)
    return {m for m in pins if m not in without}, pins


def _entry(
    model_id: str, version: str | None, registry: Registry, required_by: str | None
) -> ModelEntry:
    why = f" (required by {required_by})" if required_by else ""
    if model_id not in registry.known_ids():
        raise ResolutionError(
            f"unknown model '{model_id}'{why}",
            kind="unknown",
            models=(model_id,),
            short=f"needs unknown model {model_id}",
        )
    if not registry.has(model_id):
        reason = registry.left_out_reasons(model_id)[0]
        raise ResolutionError(
            f"model '{model_id}'{why} was left out by the registry: {reason}",
            kind="left_out",
            models=(model_id,),
            short=f"left out: {reason}",
        )
    if version is not None and not registry.has(model_id, version):
        reasons = registry.left_out_reasons(model_id, version)
        if reasons:
            raise ResolutionError(
                f"model '{model_id}@{version}'{why} was left out by the registry: {reasons[0]}",
                kind="left_out",
                models=(model_id,),
                short=f"left out: {reasons[0]}",
            )
        raise ResolutionError(
            f"model '{model_id}' has no version {version}{why}; versions: "
            f"{', '.join(registry.versions(model_id))}",
            kind="version",
            models=(model_id,),
            short=f"no version {version}",
        )
    return registry.get(model_id, version)


# --- closure ----------------------------------------------------------------------------------


def _hard_dependencies(manifest: Manifest) -> list[str]:
    ids = set(manifest.requires)
    ids.update(s.sources[0].model for s in manifest.upstream_inputs if len(s.sources) == 1)
    return sorted(ids)


def _close_fitted(
    explicit: Iterable[str],
    pins: dict[str, str | None],
    excluded: set[str],
    registry: Registry,
) -> tuple[dict[str, ModelEntry], dict[str, str]]:
    """`_close`, with an unpinned source held at the version its consumers were fitted on.

    A model without a version (selected, or added as a requirement) means "the latest that
    fits": when every consumer in the graph that declares `fitted_on` for it names the same
    version, that version is taken (e.g. lesion-seg under dr-grade fitted on an older
    lesion-seg). A user's pin is kept; a disagreement is left for `_check_inputs` to refuse,
    naming both.
    """
    held = dict(pins)
    for _ in range(len(registry.known_ids()) + 1):
        chosen, defaults = _close(explicit, held, excluded, registry)
        wanted: dict[str, set[str]] = {}
        for entry in chosen.values():
            for spec in entry.manifest.upstream_inputs:
                for source, version in spec.fitted_on.items():
                    wanted.setdefault(source, set()).add(version)
        moves = {
            source: next(iter(versions))
            for source, versions in wanted.items()
            if source in chosen and len(versions) == 1 and pins.get(source) is None
            and held.get(source) is None and chosen[source].version not in versions
        }
        if not moves:
            return chosen, defaults
        held.update(moves)
    return chosen, defaults  # pragma: no cover - each pass holds at least one more source


def _close(
    explicit: Iterable[str],
    pins: dict[str, str | None],
    excluded: set[str],
    registry: Registry,
) -> tuple[dict[str, ModelEntry], dict[str, str]]:
    """The explicit models plus everything they need. Returns (chosen, reason for defaults)."""
    chosen = {m: _entry(m, pins.get(m), registry, None) for m in sorted(explicit)}
    defaults: dict[str, str] = {}
    while True:
        stack = sorted(chosen, reverse=True)
        while stack:
            model_id = stack.pop()
            for dep in _hard_dependencies(chosen[model_id].manifest):
                if dep not in chosen:
                    chosen[dep] = _entry(dep, pins.get(dep), registry, model_id)
                    stack.append(dep)
        pending = [
            (model_id, spec)
            for model_id in sorted(chosen)
            for spec in chosen[model_id].manifest.upstream_inputs
            if len(spec.sources) > 1 and not any(r.model in chosen for r in spec.sources)
        ]
        if not pending:
            return chosen, defaults
        model_id, spec = pending[0]
        source = _default_source(model_id, spec, excluded, registry, chosen)
        chosen[source.model] = _entry(source.model, pins.get(source.model), registry, model_id)
        defaults[source.model] = f"default source of {model_id}.{spec.name}"


def _default_source(
    model_id: str,
    spec: UpstreamInput,
    excluded: set[str],
    registry: Registry,
    chosen: dict[str, ModelEntry],
) -> OutputRef:
    memo: dict[str, bool] = {}
    # Skip an alternative that cannot run without a switched-off model: the next may.
    usable = [r for r in spec.sources if _satisfiable(r.model, excluded, registry, memo)]
    for ref in usable:
        # Prefer one that does not conflict with what the graph already holds.
        theirs = registry.get(ref.model).manifest.conflicts
        if not any(
            m in theirs or ref.model in entry.manifest.conflicts for m, entry in chosen.items()
        ):
            return ref
    if usable:
        return usable[0]  # the conflict is then refused, naming both models
    for ref in spec.sources:
        # None can: take one anyway, so that the consumer is dropped as needing it.
        if registry.has(ref.model):
            return ref
    listed = ", ".join(str(r) for r in spec.sources)
    raise ResolutionError(
        f"input '{spec.name}' of {model_id} has no available source among {listed} "
        "(all left out by the registry)",
        kind="input",
        models=(model_id,),
        short=f"input {spec.name} has no available source",
    )


def _satisfiable(
    model_id: str, excluded: set[str], registry: Registry, memo: dict[str, bool]
) -> bool:
    """Can the model run with nothing switched off: its requirements, and some source for
    each input? (Latest versions; a cycle counts as unsatisfiable, refused later anyway.)"""
    if model_id in memo:
        return memo[model_id]
    memo[model_id] = False  # in progress: a cycle back here does not satisfy
    ok = model_id not in excluded and registry.has(model_id)
    if ok:
        manifest = registry.get(model_id).manifest
        ok = all(_satisfiable(r, excluded, registry, memo) for r in manifest.requires) and all(
            any(_satisfiable(ref.model, excluded, registry, memo) for ref in spec.sources)
            for spec in manifest.upstream_inputs
        )
    memo[model_id] = ok
    return ok


def _bind_inputs(chosen: dict[str, ModelEntry]) -> dict[str, dict[str, OutputRef]]:
    bindings: dict[str, dict[str, OutputRef]] = {}
    for model_id in sorted(chosen):
        for spec in chosen[model_id].manifest.upstream_inputs:
            ref = next(r for r in spec.sources if r.model in chosen)
            bindings.setdefault(model_id, {})[spec.name] = ref
    return bindings


# --- checks -----------------------------------------------------------------------------------


def _why(model_id: str, explicit: set[str]) -> str:
    return "selected" if model_id in explicit else "added as a requirement"


def _check_modality(
    chosen: dict[str, ModelEntry], modality: str | None, explicit: set[str]
) -> None:
    if modality is None:
        return
    for model_id in sorted(chosen):
        accepted = chosen[model_id].manifest.modalities
        if modality not in accepted:
            raise ResolutionError(
                f"model '{model_id}' ({_why(model_id, explicit)}) does not accept modality "
                f"{modality}; it accepts {', '.join(accepted)}",
                kind="modality",
                models=(model_id,),
                short=f"needs modality {' or '.join(accepted)}",
            )


def _check_inputs(
    chosen: dict[str, ModelEntry], bindings: dict[str, dict[str, OutputRef]]
) -> None:
    # The registry checked against the latest version; a pinned source may be older.
    for consumer, inputs in sorted(bindings.items()):
        specs = {spec.name: spec for spec in chosen[consumer].manifest.upstream_inputs}
        for name, ref in sorted(inputs.items()):
            source = chosen[ref.model].manifest
            problem = input_source_problem(specs[name], ref, source) or input_version_problem(
                specs[name], ref, source
            )
            if problem is not None:
                raise ResolutionError(
                    f"{consumer}: {problem}; pick a version of {ref.model} that fits",
                    kind="input",
                    models=(consumer, ref.model),
                    short=f"{ref.model}@{source.version} cannot feed {name}",
                )


def _edges(
    chosen: dict[str, ModelEntry], bindings: dict[str, dict[str, OutputRef]]
) -> list[Edge]:
    edges = []
    for model_id in sorted(chosen):
        for dep in chosen[model_id].manifest.requires:
            edges.append(Edge(dep, model_id, "requires"))
        for name, ref in sorted(bindings.get(model_id, {}).items()):
            edges.append(Edge(ref.model, model_id, "data", output=ref.output, input=name))
    return edges


def _check_cycles(chosen: dict[str, ModelEntry], edges: list[Edge]) -> None:
    needs: dict[str, list[str]] = {m: [] for m in chosen}
    for e in edges:
        needs[e.target].append(e.source)
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(set(needs[node])):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(chosen):
        if start not in state:
            cycle = visit(start)
            if cycle:
                text = " -> ".join(cycle)
                raise ResolutionError(
                    f"dependency cycle: {text} (each needs the next through requires or "
                    "from:); break it in one of these manifests",
                    kind="cycle",
                    models=tuple(cycle[:-1]),
                    short=f"dependency cycle {text}",
                )


def _check_conflicts(chosen: dict[str, ModelEntry], explicit: set[str], edges: list[Edge]) -> None:
    requirers: dict[str, set[str]] = {}
    for e in edges:
        requirers.setdefault(e.source, set()).add(e.target)

    def why(model_id: str) -> str:
        if model_id in explicit:
            return "selected"
        return f"required by {', '.join(sorted(requirers.get(model_id, set())))}"

    for a in sorted(chosen):
        for b in sorted(chosen):
            if a >= b:
                continue
            declared_by = [
                x for x, y in ((a, b), (b, a)) if y in chosen[x].manifest.conflicts
            ]
            if declared_by:
                other = b if declared_by[0] == a else a
                rule = f"{declared_by[0]}'s manifest lists {other} under conflicts"
                raise ResolutionError(
                    f"{a} ({why(a)}) conflicts with {b} ({why(b)}): {rule}; "
                    "switch one of them off",
                    kind="conflict",
                    models=(a, b),
                    short=f"conflicts with {b}",
                )


def _stages(chosen: dict[str, ModelEntry], edges: list[Edge]) -> tuple[tuple[str, ...], ...]:
    needs: dict[str, set[str]] = {m: set() for m in chosen}
    for e in edges:
        needs[e.target].add(e.source)
    depth: dict[str, int] = {}

    def stage(node: str) -> int:
        if node not in depth:
            depth[node] = 1 + max((stage(d) for d in needs[node]), default=-1)
        return depth[node]

    for node in sorted(chosen):
        stage(node)
    count = 1 + max(depth.values(), default=-1)
    return tuple(tuple(sorted(m for m, d in depth.items() if d == i)) for i in range(count))

"""A resolved graph -> the model list that resolves to exactly that graph again.

A preset saved from a selection must not depend on how the selection was made: a model that
came along as a requirement or as the first usable alternative of an input (vessel-seg-classic
when vessel-seg is switched off) would be chosen afresh at the next resolution, and the
resolver's default is the *other* alternative. So the saved combination lists every model the
graph holds. A resolved graph is closed (every requirement and one source of every input are
in it), so resolving that list adds nothing and binds every input to the same source.

Versions: a model keeps the reference the selection gave it (a pin stays a pin); a model at
the registry's latest version is listed by id (it follows new versions, like any preset);
one held at an older version is pinned to it, or it would move.
"""

from __future__ import annotations

from collections.abc import Sequence

from dicomnode.graph.model import ResolvedGraph
from dicomnode.registry.registry import Registry


def combination(graph: ResolvedGraph, refs: Sequence[str], registry: Registry) -> list[str]:
    """Every model of `graph` as a reference: those in `refs` first (in their order and
    spelling, when the version agrees), then the others sorted by id."""
    given = {ref.partition("@")[0]: ref for ref in refs}
    out: list[str] = []
    ordered = [m for m in given if m in graph.models]
    ordered += sorted(m for m in graph.models if m not in given)
    for model_id in ordered:
        version = graph.models[model_id]
        ref = given.get(model_id)
        if ref is not None and "@" in ref and ref.partition("@")[2] in (version, "latest"):
            out.append(ref)
        elif registry.has(model_id) and registry.get(model_id).version == version:
            out.append(model_id)
        else:
            out.append(f"{model_id}@{version}")
    return out

"""For a selection, can each registry model be added, and if not, why (the console's greys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dicomnode.errors import ResolutionError
from dicomnode.graph.model import ResolvedGraph
from dicomnode.graph.resolver import resolve
from dicomnode.graph.selection import Selection
from dicomnode.registry.registry import Registry

ChoiceState = Literal["selected", "required", "available", "unavailable"]


@dataclass(frozen=True)
class Choice:
    """`ok`: the model is in the graph or can be switched on; `reason` says why (not)."""

    ok: bool
    reason: str
    state: ChoiceState

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "reason": self.reason, "state": self.state}


def selectable(selection: Selection, registry: Registry) -> dict[str, Choice]:
    """Every model the registry knows (accepted or left out), sorted by id."""
    try:
        base: ResolvedGraph | None = resolve(selection, registry)
        failure: ResolutionError | None = None
    except ResolutionError as exc:
        base, failure = None, exc
    named = {ref.partition("@")[0] for ref in (*selection.models, *selection.with_models)}
    choices: dict[str, Choice] = {}
    for model_id in registry.known_ids():
        if not registry.has(model_id):
            reason = registry.left_out_reasons(model_id)[0]
            choices[model_id] = Choice(False, f"left out: {reason}", "unavailable")
        elif failure is not None:
            # Adding anything to a selection that does not resolve fails for the same reason;
            # say that once, plainly, instead of blaming each model.
            state: ChoiceState = "selected" if model_id in named else "unavailable"
            choices[model_id] = Choice(
                False, f"the selection does not resolve: {failure}", state
            )
        elif base is not None and model_id in base.selected:
            choices[model_id] = Choice(True, "selected", "selected")
        elif base is not None and model_id in base.added:
            choices[model_id] = Choice(True, base.added[model_id], "required")
        else:
            choices[model_id] = _try_adding(model_id, selection, registry, base)
    return choices


def _try_adding(
    model_id: str, selection: Selection, registry: Registry, base: ResolvedGraph | None
) -> Choice:
    try:
        graph = resolve(selection.plus(model_id), registry)
    except ResolutionError as exc:
        return Choice(False, _relative_reason(model_id, exc, base), "unavailable")
    before = set(base.models) if base is not None else set()
    brings = sorted(set(graph.models) - before - {model_id})
    gone = sorted(set(before) - set(graph.models))
    parts = ["can be added"]
    if brings:
        parts.append(f"brings {', '.join(brings)}")
    if gone:
        parts.append(f"replaces {', '.join(gone)}")
    return Choice(True, "; ".join(parts), "available")


def _relative_reason(model_id: str, exc: ResolutionError, base: ResolvedGraph | None) -> str:
    """Phrase the refusal from the point of view of the model being switched on."""
    if exc.kind == "conflict" and len(exc.models) == 2:
        a, b = exc.models
        in_base = set(base.models) if base is not None else set()
        if model_id in exc.models:
            other = b if model_id == a else a
            return f"conflicts with {other}"
        new, other = (a, b) if a not in in_base else (b, a)
        return f"needs {new}, which conflicts with {other}"
    if exc.kind in ("modality", "left_out", "unknown") and exc.models and (
        exc.models[0] != model_id
    ):
        return f"needs {exc.models[0]}, which {_lower(exc.short)}"
    return exc.short


def _lower(text: str) -> str:
    # "left out: ..." reads "needs x, which was left out: ..."
    if text.startswith("left out"):
        return "was " + text
    if text.startswith("needs unknown"):
        return "is unknown"
    return text

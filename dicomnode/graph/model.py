"""The resolved graph: which models (and versions) run, in which stages, and why.

Stored with every job (`to_dict` / `from_dict`), so a result can always be traced to the exact
models and versions that made it and to the reason each one was there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

EdgeKind = Literal["requires", "data"]


@dataclass(frozen=True, order=True)
class Edge:
    """`source` runs before `target`: a requirement, or data (source.output -> target.input)."""

    source: str
    target: str
    kind: EdgeKind
    output: str | None = None
    input: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"from": self.source, "to": self.target, "kind": self.kind}
        if self.kind == "data":
            data["output"] = self.output
            data["input"] = self.input
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Edge:
        kind = data["kind"]
        if kind not in ("requires", "data"):
            raise ValueError(f"unknown edge kind {kind!r}")
        return cls(
            source=str(data["from"]),
            target=str(data["to"]),
            kind=kind,
            output=data.get("output"),
            input=data.get("input"),
        )


@dataclass(frozen=True)
class ResolvedGraph:
    """Stages run in order; the models of one stage are independent of each other."""

    stages: tuple[tuple[str, ...], ...]
    models: dict[str, str]  # id -> version
    selected: tuple[str, ...]  # chosen by the user or preset (after switching off)
    added: dict[str, str]  # id -> why it came along ("required by vessel-metrics")
    removed: dict[str, str] = field(default_factory=dict)  # id -> why it is not there
    edges: tuple[Edge, ...] = ()
    # consumer id -> input name -> "source-id.output" (the alternative the graph holds)
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    modality: str | None = None
    preset: str | None = None

    def stage_of(self, model_id: str) -> int:
        for index, stage in enumerate(self.stages):
            if model_id in stage:
                return index
        raise KeyError(model_id)

    def dependencies(self, model_id: str) -> list[str]:
        """Models that must run before this one (direct only)."""
        return sorted({e.source for e in self.edges if e.target == model_id})

    def dependants(self, model_id: str) -> list[str]:
        """Models that wait for this one (direct only)."""
        return sorted({e.target for e in self.edges if e.source == model_id})

    def transitive_dependants(self, model_id: str) -> list[str]:
        """Everything downstream: what a gate or a failure of this model affects."""
        seen: set[str] = set()
        todo = [model_id]
        while todo:
            for nxt in self.dependants(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return sorted(seen)

    @property
    def order(self) -> list[str]:
        """A valid run order (stage by stage)."""
        return [m for stage in self.stages for m in stage]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [list(stage) for stage in self.stages],
            "added": dict(self.added),
            "models": dict(self.models),
            "selected": list(self.selected),
            "removed": dict(self.removed),
            "edges": [e.to_dict() for e in self.edges],
            "inputs": {k: dict(v) for k, v in self.inputs.items()},
            "modality": self.modality,
            "preset": self.preset,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResolvedGraph:
        return cls(
            stages=tuple(tuple(str(m) for m in stage) for stage in data["stages"]),
            models={str(k): str(v) for k, v in data["models"].items()},
            selected=tuple(str(m) for m in data.get("selected", ())),
            added={str(k): str(v) for k, v in data.get("added", {}).items()},
            removed={str(k): str(v) for k, v in data.get("removed", {}).items()},
            edges=tuple(Edge.from_dict(e) for e in data.get("edges", ())),
            inputs={
                str(k): {str(i): str(s) for i, s in v.items()}
                for k, v in data.get("inputs", {}).items()
            },
            modality=data.get("modality"),
            preset=data.get("preset"),
        )

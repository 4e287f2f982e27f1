"""POST /api/resolve: a preset (or a list of models) plus switches -> graph and choices."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from dicomnode.errors import ResolutionError
from dicomnode.graph import Selection, resolve, selectable
from dicomnode.graph.combination import combination
from dicomnode.web.deps import State, Viewer

logger = logging.getLogger(__name__)

router = APIRouter(tags=["selection"])


class ResolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    preset: str | None = Field(None, description="start from this preset's models")
    models: list[str] = Field(default_factory=list, description="more base models (id or id@v)")
    with_models: list[str] = Field(default_factory=list, alias="with",
                                   description="switched on (the secondary selection)")
    without: list[str] = Field(default_factory=list, description="switched off (ids)")
    modality: str | None = Field(None, description="the study's modality, e.g. OP")


@router.post("/resolve", summary="Resolve a selection: stages, added and why, choices")
def resolve_selection(body: ResolveRequest, state: State, _: Viewer) -> JSONResponse:
    catalog = state.catalog.catalog
    base = list(body.models)
    modality = body.modality
    if body.preset is not None:
        preset = catalog.presets.presets.get(body.preset)
        if preset is None:
            raise HTTPException(404, f"no preset '{body.preset}'")
        base = [*preset.models, *base]
        if modality is None and preset.routing.modality:
            modality = preset.routing.modality[0]
    selection = Selection.of(base, with_models=body.with_models, without=body.without,
                             modality=modality, preset=body.preset)
    choices = {k: c.to_dict() for k, c in selectable(selection, catalog.registry).items()}
    try:
        graph = resolve(selection, catalog.registry)
    except ResolutionError as exc:
        return JSONResponse(status_code=422, content={
            "ok": False,
            "detail": str(exc),
            "error": {"kind": exc.kind, "models": list(exc.models), "short": exc.short},
            "choices": choices,
        })
    content: dict[str, Any] = {
        "ok": True, **graph.to_dict(), "choices": choices,
        "versions": {m: catalog.registry.versions(m) for m in graph.models},
        # What to save as a preset's `models` so that it resolves to exactly this graph.
        "combination": combination(graph, [*base, *body.with_models], catalog.registry),
    }
    return JSONResponse(content)

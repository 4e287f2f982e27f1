"""Presets: list, show, create, update, delete, validate. Changes need role admin."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Body, Header, HTTPException, Response
from fastapi.responses import JSONResponse

from dicomnode.errors import PresetError, ResolutionError
from dicomnode.graph import Selection, resolve
from dicomnode.routing import Preset
from dicomnode.routing.catalog import Catalog
from dicomnode.web import presets_store
from dicomnode.web.deps import Admin, State, Viewer
from dicomnode.web.efficacy import unmeasured
from dicomnode.web.presets_store import Change, PresetConflict, PresetMissing, PresetStale

logger = logging.getLogger(__name__)

router = APIRouter(tags=["presets"])

PresetBody = Body(
    ...,
    description="A preset as JSON: the fields of presets/*.yaml (docs/registry-and-presets.md)",
    examples=[{
        "id": "new-camera", "name": "New camera", "audience": "Primary care",
        "description": "Quality gate and vessel segmentation", "models": ["vessel-seg"],
        "routing": {"calling_ae": ["CAM9"]},
    }],
)


def preset_dict(preset: Preset, catalog: Catalog) -> dict[str, Any]:
    data = preset.model_dump(mode="json")
    path = catalog.presets.files.get(preset.id)
    data["file"] = None if path is None else path.name
    data["etag"] = (
        presets_store.content_tag(path.read_text("utf-8")) if path and path.is_file() else None
    )
    modality = preset.routing.modality[0] if preset.routing.modality else None
    try:
        graph = resolve(
            Selection.of(preset.models, modality=modality, preset=preset.id), catalog.registry
        )
        data["graph"] = graph.to_dict()
        # Models of this preset without measured figures (the console says so).
        data["unmeasured"] = unmeasured(dict(graph.models), catalog.registry)
    except ResolutionError as exc:  # the registry changed since the preset loaded
        data["graph"] = None
        data["graph_error"] = str(exc)
        data["unmeasured"] = []
    return data


def _refused(exc: PresetError) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": str(exc), "problems": presets_store.problems_as_list(exc)},
    )


def _change(change: Change) -> dict[str, Any]:
    return {"id": change.preset_id, "action": change.action, "file": change.path.name,
            "revision": change.revision, "diff": change.diff, "etag": change.etag}


@router.get("/presets", summary="Loaded presets (by audience) and refused preset files")
def list_presets(state: State, _: Viewer) -> dict[str, Any]:
    catalog = state.catalog.catalog
    return {
        "presets": [preset_dict(p, catalog) for p in catalog.presets.ordered()],
        "problems": [p.to_dict() for p in catalog.presets.problems],
    }


@router.get("/presets/{preset_id}", summary="One preset with its resolved graph")
def get_preset(preset_id: str, state: State, _: Viewer) -> dict[str, Any]:
    catalog = state.catalog.catalog
    preset = catalog.presets.presets.get(preset_id)
    if preset is None:
        raise HTTPException(404, f"no preset '{preset_id}'")
    data = preset_dict(preset, catalog)
    data["revisions"] = presets_store.revisions(state, preset_id, limit=20)
    return data


@router.post("/presets/validate", summary="Check a preset without saving it")
def validate_preset(state: State, _: Viewer, data: Any = PresetBody) -> Response:
    try:
        preset = presets_store.validate(state, data)
    except PresetError as exc:
        return _refused(exc)
    return JSONResponse({"ok": True, "preset": preset_dict(preset, state.catalog.catalog)})


@router.post("/presets", status_code=201, summary="Create a preset (written to presets/<id>.yaml)")
def create_preset(state: State, who: Admin, data: Any = PresetBody) -> Response:
    if not isinstance(data, dict):
        raise HTTPException(422, "a preset is a JSON object")
    try:
        change = presets_store.create(state, data, who.name)
    except PresetError as exc:
        return _refused(exc)
    except PresetConflict as exc:
        raise HTTPException(409, str(exc)) from exc
    return JSONResponse(_change(change), status_code=201)


@router.put("/presets/{preset_id}", summary="Replace a preset (validated, revision kept)")
def update_preset(
    preset_id: str, state: State, who: Admin, data: Any = PresetBody,
    if_match: str | None = Header(None, description="the preset's etag when it was read; "
                                  "a preset changed since then answers 412"),
) -> Response:
    if not isinstance(data, dict):
        raise HTTPException(422, "a preset is a JSON object")
    try:
        change = presets_store.update(state, preset_id, data, who.name, if_match)
    except PresetError as exc:
        return _refused(exc)
    except PresetMissing as exc:
        raise HTTPException(404, str(exc)) from exc
    except PresetConflict as exc:
        raise HTTPException(409, str(exc)) from exc
    except PresetStale as exc:
        raise HTTPException(412, str(exc)) from exc
    return JSONResponse(_change(change))


@router.delete("/presets/{preset_id}", summary="Delete a preset file (its content is kept)")
def delete_preset(preset_id: str, state: State, who: Admin) -> dict[str, Any]:
    try:
        change = presets_store.delete(state, preset_id, who.name)
    except PresetMissing as exc:
        raise HTTPException(404, str(exc)) from exc
    except PresetConflict as exc:
        raise HTTPException(409, str(exc)) from exc
    return _change(change)


@router.get("/audit/presets", summary="Preset changes: who, when, the difference")
def preset_history(state: State, _: Viewer, preset: str | None = None) -> dict[str, Any]:
    return {"revisions": presets_store.revisions(state, preset)}

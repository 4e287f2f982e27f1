"""GET /api/models, GET /api/models/{id}: what the registry holds and what it left out."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException

from dicomnode.errors import RegistryLookupError
from dicomnode.registry.registry import ModelEntry, Registry
from dicomnode.web.deps import State, Viewer
from dicomnode.web.efficacy import efficacy

logger = logging.getLogger(__name__)

router = APIRouter(tags=["models"])


def model_summary(entry: ModelEntry, registry: Registry) -> dict[str, Any]:
    m = entry.manifest
    return {
        "id": m.id,
        "version": m.version,
        "versions": registry.versions(m.id),
        "name": m.name,
        "description": m.description,
        "task": m.task,
        "modalities": list(m.modalities),
        "requires": list(m.requires),
        "conflicts": list(m.conflicts),
        "metrics": [metric.model_dump(mode="json") for metric in m.metrics],
        # Figures per dataset with their intervals, operating points; measured: any figures.
        **efficacy(m),
        "left_out": False,
    }


def list_models(registry: Registry) -> list[dict[str, Any]]:
    items = [model_summary(entry, registry) for entry in registry.latest_entries()]
    accepted = set(registry.ids())
    for lo in registry.left_out:
        if lo.id not in accepted:
            items.append({"id": lo.id, "version": lo.version, "left_out": True,
                          "reason": lo.reason})
    return sorted(items, key=lambda item: str(item["id"]))


@router.get("/models", summary="Every model: latest accepted version, or why it was left out")
def get_models(state: State, _: Viewer) -> dict[str, Any]:
    registry = state.catalog.catalog.registry
    return {
        "models": list_models(registry),
        "left_out": [
            {"id": lo.id, "version": lo.version, "reason": lo.reason} for lo in registry.left_out
        ],
    }


@router.get("/models/{model_id}", summary="Manifest, card text and measured metrics")
def get_model(model_id: str, state: State, _: Viewer, version: str | None = None
              ) -> dict[str, Any]:
    registry = state.catalog.catalog.registry
    try:
        entry = registry.get(model_id, version)
    except RegistryLookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    card = None
    if entry.card_path is not None and entry.card_path.is_file():
        card = entry.card_path.read_text(encoding="utf-8", errors="replace")
    return {
        **model_summary(entry, registry),
        "manifest": entry.manifest.model_dump(mode="json", by_alias=True, exclude_none=True),
        "card": card,
        "left_out_versions": [
            {"version": lo.version, "reason": lo.reason}
            for lo in registry.left_out if lo.id == model_id
        ],
    }

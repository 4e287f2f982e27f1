"""POST /api/studies/{uid}/rerun: run a finished study again (admin), audited with the user."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from dicomnode.errors import PresetError, ResolutionError, StudyNotFoundError
from dicomnode.jobs.rerun import RerunRefused, rerun_study
from dicomnode.web.deps import Admin, State

logger = logging.getLogger(__name__)

router = APIRouter(tags=["studies"])


class RerunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    preset: str | None = Field(None, description="preset to run (default: the study's latest "
                               "job's preset, else routing decides)")
    with_models: list[str] = Field(default_factory=list, alias="with",
                                   description="models switched on (id or id@version)")
    without: list[str] = Field(default_factory=list, description="models switched off (ids)")


@router.post("/studies/{study_uid}/rerun", status_code=202,
             summary="Run a finished or failed study again; the new results supersede the old")
def rerun(study_uid: str, state: State, who: Admin,
          body: RerunRequest | None = None) -> JSONResponse:
    body = body or RerunRequest.model_validate({})
    catalog = state.catalog.catalog
    try:
        queued = rerun_study(
            state.database, state.settings.storage.path, catalog.registry, catalog.presets,
            state.settings.modality_defaults, study_uid, actor=who.name,
            preset=body.preset, with_models=body.with_models, without=body.without,
        )
    except StudyNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except PresetError as exc:
        raise HTTPException(404, str(exc)) from exc
    except RerunRefused as exc:
        raise HTTPException(409, str(exc)) from exc
    except ResolutionError as exc:
        content: dict[str, Any] = {"detail": str(exc), "error": {
            "kind": exc.kind, "models": list(exc.models), "short": exc.short}}
        return JSONResponse(status_code=422, content=content)
    return JSONResponse(status_code=202, content=queued.as_json())

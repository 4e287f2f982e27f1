"""POST /api/route-test: which preset would a study get, and which conditions held.

Takes uploaded DICOM files (headers only are read) or a received study's UID. `draft` is the
preset being edited in the console (JSON): it is tested in place of the saved one with the same
id, so conditions can be tried before they are saved.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.errors import PresetError, StudyNotFoundError
from dicomnode.jobs.planning import study_facts
from dicomnode.routing import StudyFacts, route, validate_preset_data
from dicomnode.web import presets_store
from dicomnode.web.deps import State, Viewer

logger = logging.getLogger(__name__)

router = APIRouter(tags=["routing"])

# Headers only: an upload larger than this is not a fundus photograph's header worth reading.
MAX_UPLOAD_BYTES = 256 * 1024 * 1024
# A study's worth of files; more is not a routing question.
MAX_UPLOAD_FILES = 50


def _read(upload: UploadFile) -> Dataset:
    data = upload.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"{upload.filename}: larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        return dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise HTTPException(422, f"{upload.filename}: not a DICOM file ({exc})") from exc


@router.post("/route-test", summary="Route uploaded files or a received study; explain it")
def route_test(
    state: State,
    _: Viewer,
    files: list[UploadFile] | None = None,
    study_uid: Annotated[str | None, Form()] = None,
    calling_ae: Annotated[str | None, Form()] = None,
    called_ae: Annotated[str | None, Form()] = None,
    draft: Annotated[str | None, Form(description="a preset (JSON) to test unsaved")] = None,
) -> JSONResponse:
    settings = state.settings
    catalog = state.catalog.catalog
    if files:
        if len(files) > MAX_UPLOAD_FILES:
            raise HTTPException(413, f"{len(files)} files: at most {MAX_UPLOAD_FILES} at once")
        datasets = [_read(upload) for upload in files]
        facts = StudyFacts.from_datasets(
            datasets, calling_ae=calling_ae or None,
            called_ae=called_ae or settings.node.ae_title,
        )
    elif study_uid:
        try:
            facts = study_facts(state.database, settings.storage.path, study_uid.strip())
        except StudyNotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
    else:
        raise HTTPException(422, "upload DICOM files ('files') or give a received 'study_uid'")
    presets = dict(catalog.presets.presets)
    if draft:
        try:
            data: Any = json.loads(draft)
            preset = validate_preset_data(
                data, registry=catalog.registry, destinations=set(settings.destinations)
            )
        except json.JSONDecodeError as exc:
            raise HTTPException(422, f"draft is not JSON: {exc}") from exc
        except PresetError as exc:
            return JSONResponse(status_code=422, content={
                "detail": str(exc), "problems": presets_store.problems_as_list(exc)})
        presets[preset.id] = preset
    decision = route(facts, presets.values(), settings.modality_defaults)
    return JSONResponse({
        **decision.to_dict(),
        "instances": len(facts.instances),
        "calling_ae": list(facts.calling_ae_titles),
        "called_ae": list(facts.called_ae_titles),
        "draft": draft is not None and bool(draft),
    })

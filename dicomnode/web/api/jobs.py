"""One processing job as JSON: graph, model runs, outcome, and each image not analysed with
its coded reason (the same record `dicomnode job show --json` prints)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException

from dicomnode.errors import JobNotFoundError
from dicomnode.jobs.queue import job_detail
from dicomnode.web.deps import State, Viewer

logger = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}", summary="A job: graph, model runs, outcome, images not analysed")
def get_job(job_id: int, state: State, _: Viewer) -> dict[str, Any]:
    try:
        return job_detail(state.database, job_id)
    except JobNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc

"""GET /api/openapi.json: the OpenAPI document, for signed-in principals only.

FastAPI would serve it to anyone; it lists every endpoint and parameter, which is a map of
the node for someone who has no account, so it is served here behind the same check as the API.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dicomnode.web.deps import Viewer

logger = logging.getLogger(__name__)

router = APIRouter(tags=["schema"])

OPENAPI_PATH = "/openapi.json"


@router.get(OPENAPI_PATH, include_in_schema=False)
def openapi(request: Request, _: Viewer) -> JSONResponse:
    # FastAPI builds the document once per set of routes and keeps it.
    return JSONResponse(request.app.openapi())

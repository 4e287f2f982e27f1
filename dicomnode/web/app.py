"""The FastAPI application: REST API under /api, Prometheus at /metrics, console at /.

OpenAPI is published at /api/openapi.json to signed-in principals only (dicomnode.web.api.schema).
There is no /api/docs: FastAPI's docs page would load Swagger UI from a CDN.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from dicomnode import __version__
from dicomnode.web import console, stow
from dicomnode.web.api import (
    health,
    jobs,
    models,
    presets,
    rerun,
    resolve,
    results,
    route_test,
    schema,
    studies,
    users,
)
from dicomnode.web.state import WebState

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"

# Everything the console loads is ours: no other origin may run script in it or frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def create_app(state: WebState) -> FastAPI:
    app = FastAPI(
        title="dicomnode",
        version=__version__,
        description="DICOM AI gateway for retinal imaging: models, presets, routing, studies. "
        "Authenticate with 'Authorization: Bearer <token>' (dicomnode users token NAME).",
        # Served by api.schema behind authentication instead of FastAPI's open route.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.web = state
    app.state.destination_echoes = health.EchoCache()
    app.middleware("http")(_security_headers)
    for module in (models, presets, resolve, route_test, studies, jobs, rerun, results, health,
                   users, schema):
        app.include_router(module.router, prefix="/api")
    app.include_router(health.metrics_router)
    app.include_router(stow.router)
    app.include_router(console.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

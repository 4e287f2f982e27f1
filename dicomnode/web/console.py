"""The console: server-rendered pages (Jinja2) plus a little vanilla JS, all assets local.

Pages read the same functions the API serves; changes go through the API with the session's
CSRF token, so the console has no second write path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicomnode.db.models import UserRole
from dicomnode.errors import UserError
from dicomnode.jobs.health import execution_report
from dicomnode.jobs.rerun import RERUNNABLE
from dicomnode.web import accounts, auth, presets_store
from dicomnode.web.api.models import get_model, list_models
from dicomnode.web.api.presets import preset_dict
from dicomnode.web.api.studies import STATES, get_study, list_studies
from dicomnode.web.auth import Principal
from dicomnode.web.deps import SESSION_COOKIE, State, current_principal, optional_principal
from dicomnode.web.login_throttle import LoginLimits, LoginThrottled

logger = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")

router = APIRouter(include_in_schema=False)

STUDIES_PER_PAGE = 50


def page_principal(
    request: Request, principal: Annotated[Principal | None, Depends(optional_principal)]
) -> Principal:
    if principal is None:
        raise HTTPException(303, headers={
            "Location": "/login?next=" + quote(request.url.path)})
    return principal


Page = Annotated[Principal, Depends(page_principal)]


def render(request: Request, name: str, who: Principal | None, **context: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(
        request, name, {"who": who, "csrf": who.csrf if who else None, **context}
    )


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/presets") -> HTMLResponse:
    return render(request, "login.html", None, next=next, error=None)


def same_origin(request: Request, *, behind_proxy: bool = False) -> bool:
    """Whether a form post comes from this console's own page, by the headers browsers set
    on every cross-site POST (Sec-Fetch-Site, Origin). A request without either (a script,
    an old browser) is not a cross-site browser request. Behind a trusted reverse proxy
    (`web.trusted_proxies`) the host the browser used may arrive as X-Forwarded-Host."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":  # sandboxed frames, data: URLs, some redirects
        return False
    hosts = {request.headers.get("host", "").lower()}
    if behind_proxy and "x-forwarded-host" in request.headers:
        hosts.add(request.headers["x-forwarded-host"].split(",")[0].strip().lower())
    return urlsplit(origin).netloc.lower() in hosts


def _safe_next(target: str) -> str:
    # Only local paths: an open redirect would let a link log someone in and send them away.
    # Browsers read "/\\host" like "//host", so a backslash is refused too.
    safe = target.startswith("/") and not target.startswith("//") and "\\" not in target
    return target if safe else "/presets"


@router.post("/login")
def login_submit(
    request: Request, state: State,
    username: Annotated[str, Form()], password: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/presets",
) -> Response:
    minutes = state.settings.web.session_minutes
    address = request.client.host if request.client else None
    if not same_origin(request, behind_proxy=bool(state.settings.web.trusted_proxies)):
        # Login CSRF: another site's form must not sign this browser in (as its author).
        auth.record_refusal(state.database, "login-cross-site", username.strip(), address,
                            f"Origin {request.headers.get('origin')!r}, Sec-Fetch-Site "
                            f"{request.headers.get('sec-fetch-site')!r}")
        response = render(request, "login.html", None, next="/presets",
                          error="This sign-in did not come from this console's own page.")
        response.status_code = 403
        return response
    try:
        secret, _ = auth.login(state.database, username.strip(), password, minutes,
                               address=address,
                               limits=LoginLimits.from_settings(state.settings.web))
    except LoginThrottled as exc:
        response = render(request, "login.html", None, next=next, error=str(exc))
        response.status_code = 429
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except UserError as exc:
        response = render(request, "login.html", None, next=next, error=str(exc))
        response.status_code = 401
        return response
    redirect = RedirectResponse(_safe_next(next), status_code=303)
    redirect.set_cookie(
        SESSION_COOKIE, secret, max_age=minutes * 60, httponly=True, samesite="strict",
        secure=state.settings.web.cookies_secure, path="/",
    )
    return redirect


@router.post("/logout")
def logout(
    request: Request, state: State, _: Annotated[Principal, Depends(current_principal)]
) -> Response:
    secret = request.cookies.get(SESSION_COOKIE)
    if secret:
        auth.logout(state.database, secret)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/")
def home() -> Response:
    return RedirectResponse("/presets", status_code=303)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, state: State, who: Page) -> HTMLResponse:
    registry = state.catalog.catalog.registry
    return render(request, "models.html", who, models=list_models(registry), page="models")


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(model_id: str, request: Request, state: State, who: Page) -> HTMLResponse:
    return render(request, "model.html", who, model=get_model(model_id, state, who),
                  page="models")


@router.get("/presets", response_class=HTMLResponse)
def presets_page(request: Request, state: State, who: Page) -> HTMLResponse:
    catalog = state.catalog.catalog
    groups: dict[str, list[dict[str, Any]]] = {}
    for preset in catalog.presets.ordered():
        groups.setdefault(preset.audience, []).append(preset_dict(preset, catalog))
    return render(request, "presets.html", who, groups=dict(sorted(groups.items())),
                  problems=[str(p) for p in catalog.presets.problems], page="presets")


def _editor(request: Request, state: State, who: Principal, preset: dict[str, Any],
            is_new: bool) -> HTMLResponse:
    registry = state.catalog.catalog.registry
    data = {
        "preset": preset, "is_new": is_new, "admin": who.is_admin, "csrf": who.csrf,
        "models": {m["id"]: m for m in list_models(registry)},
        "destinations": sorted(state.settings.destinations),
    }
    return render(request, "preset.html", who, preset=preset, data=data, is_new=is_new,
                  page="presets")


@router.get("/presets/new", response_class=HTMLResponse)
def new_preset_page(request: Request, state: State, who: Page,
                    start: str | None = None) -> HTMLResponse:
    catalog = state.catalog.catalog
    if start and start in catalog.presets.presets:
        preset = preset_dict(catalog.presets.presets[start], catalog)
        preset.update(id=f"{start}-copy", name=f"{preset['name']} (copy)")
    else:
        # Nothing selected yet: the page offers every model, each with what it brings along.
        preset = {"id": "", "name": "", "audience": "", "description": "",
                  "models": [], "optional_models": [],
                  "outputs": {"sr": True, "seg": True, "overlay": False},
                  "destinations": [], "completeness": {}, "routing": {"modality": ["OP"]},
                  "priority": 0, "enabled": True}
    return _editor(request, state, who, preset, True)


@router.get("/presets/{preset_id}", response_class=HTMLResponse)
def preset_page(preset_id: str, request: Request, state: State, who: Page) -> HTMLResponse:
    catalog = state.catalog.catalog
    preset = catalog.presets.presets.get(preset_id)
    if preset is None:
        raise HTTPException(404, f"no preset '{preset_id}'")
    return _editor(request, state, who, preset_dict(preset, catalog), False)


@router.get("/studies", response_class=HTMLResponse)
def studies_page(request: Request, state: State, who: Page, study_state: str | None = None,
                 date_from: str | None = None, date_to: str | None = None,
                 patient_id: str | None = None, preset: str | None = None,
                 offset: int = 0) -> HTMLResponse:
    filters = {"study_state": study_state or None, "date_from": date_from or None,
               "date_to": date_to or None, "patient_id": patient_id or None,
               "preset": preset or None}
    data = list_studies(state, who, limit=STUDIES_PER_PAGE, offset=offset, **filters)

    def link(**change: Any) -> str:
        query = {k: v for k, v in {**filters, **change}.items() if v not in (None, "", 0)}
        return "/studies" + ("?" + urlencode(query) if query else "")

    pages = {
        "previous": link(offset=max(0, offset - STUDIES_PER_PAGE)) if offset > 0 else None,
        "next": link(offset=offset + STUDIES_PER_PAGE)
        if offset + STUDIES_PER_PAGE < data["total"] else None,
    }
    return render(request, "studies.html", who, studies=data["studies"], counts=data["states"],
                  states=STATES, current=study_state, filters=filters, total=data["total"],
                  offset=offset, pages=pages, link=link,
                  presets=[p.id for p in state.catalog.catalog.presets.ordered()],
                  page="studies")


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(study_uid: str, request: Request, state: State, who: Page) -> HTMLResponse:
    study = get_study(study_uid, state, who)
    jobs = study["jobs"]
    return render(request, "study.html", who, study=study, page="studies",
                  presets=[p.id for p in state.catalog.catalog.presets.ordered()],
                  current_preset=jobs[-1]["preset"] if jobs else None,
                  rerunnable=RERUNNABLE)


@router.get("/health", response_class=HTMLResponse)
def health_page(request: Request, state: State, who: Page) -> HTMLResponse:
    return render(request, "health.html", who, page="health",
                  execution=execution_report(state.database, probe=True))


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, state: State, who: Page) -> HTMLResponse:
    return render(request, "audit.html", who, revisions=presets_store.revisions(state),
                  page="audit")


@router.get("/users", response_class=HTMLResponse)
def users_page(request: Request, state: State, who: Page) -> HTMLResponse:
    if not who.is_admin:
        raise HTTPException(403, f"user '{who.name}' has role {who.role}; the users page needs "
                            "role admin")
    users = accounts.list_accounts(state.database, LoginLimits.from_settings(state.settings.web))
    return render(request, "users.html", who, users=[u.as_json() for u in users],
                  roles=UserRole.ALL, page="users")

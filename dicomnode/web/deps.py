"""FastAPI dependencies: the shared state, who is asking, and whether they may change things.

A request proves who it is with `Authorization: Bearer <token>` (API clients) or the console's
session cookie. Session requests that are not GET/HEAD must also echo the session's CSRF token
(header `X-CSRF-Token` or form field `csrf_token`): a cookie alone is sent by the browser for
any site's form, the token only by our own pages.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from dicomnode.db.models import UserRole
from dicomnode.web import auth
from dicomnode.web.auth import Principal
from dicomnode.web.state import WebState

logger = logging.getLogger(__name__)

SESSION_COOKIE = "dicomnode_session"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def get_state(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state


State = Annotated[WebState, Depends(get_state)]


def bearer_principal(request: Request, state: State) -> Principal | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return auth.principal_for_token(state.database, header[7:].strip())
    return None


def optional_principal(request: Request, state: State) -> Principal | None:
    principal = bearer_principal(request, state)
    if principal is None:
        secret = request.cookies.get(SESSION_COOKIE)
        if secret:
            principal = auth.principal_for_session(state.database, secret)
    if principal is not None and principal.role == UserRole.SENDER:
        # A gateway's account sends studies and sees nothing (not even as a viewer).
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"user '{principal.name}' has role sender: it may only send "
                            "studies (POST /dicomweb/studies)")
    return principal


async def _form_csrf(request: Request) -> str | None:
    content_type = request.headers.get("content-type", "")
    if "form" not in content_type:
        return None
    form = await request.form()
    value = form.get("csrf_token")
    return value if isinstance(value, str) else None


async def current_principal(
    request: Request, principal: Annotated[Principal | None, Depends(optional_principal)]
) -> Principal:
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "log in, or send 'Authorization: Bearer <token>' (dicomnode users token NAME)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if principal.via == "session" and request.method not in _SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER) or await _form_csrf(request)
        if not sent or principal.csrf is None or not hmac.compare_digest(sent, principal.csrf):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "CSRF token missing or wrong")
    return principal


Viewer = Annotated[Principal, Depends(current_principal)]


def require_admin(principal: Viewer) -> Principal:
    if not principal.is_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"user '{principal.name}' has role {principal.role}; changes need role admin",
        )
    return principal


Admin = Annotated[Principal, Depends(require_admin)]

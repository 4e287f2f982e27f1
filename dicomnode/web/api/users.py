"""Users (admin only): list, password, role, disable/enable, remove, unlock, revoke tokens.

Every change is audited with the administrator's name (web.accounts, shared with the CLI).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict

from dicomnode.errors import UserError
from dicomnode.web import accounts
from dicomnode.web.accounts import LastAdmin, UserNotFound
from dicomnode.web.deps import Admin, State
from dicomnode.web.login_throttle import LoginLimits

logger = logging.getLogger(__name__)

router = APIRouter(tags=["users"])


class PasswordBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str


class RoleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str


def _answer(state: State, name: str) -> dict[str, Any]:
    for account in accounts.list_accounts(state.database,
                                          LoginLimits.from_settings(state.settings.web)):
        if account.name == name:
            return account.as_json()
    raise HTTPException(404, f"no user '{name}'")


def _guard(exc: UserError) -> HTTPException:
    if isinstance(exc, UserNotFound):
        return HTTPException(404, str(exc))
    if isinstance(exc, LastAdmin):
        return HTTPException(409, str(exc))
    return HTTPException(422, str(exc))


@contextmanager
def _refused_as_http() -> Iterator[None]:
    """A refused change answers with its status: 404 unknown user, 409 last admin, else 422."""
    try:
        yield
    except UserError as exc:
        raise _guard(exc) from exc


@router.get("/users", summary="Users with role, state, API tokens and failed sign-ins")
def list_users(state: State, _: Admin) -> dict[str, Any]:
    limits = LoginLimits.from_settings(state.settings.web)
    return {"users": [a.as_json() for a in accounts.list_accounts(state.database, limits)]}


@router.post("/users/{name}/password", summary="Set a password (the user's sessions end)")
def set_password(name: str, body: PasswordBody, state: State, who: Admin) -> dict[str, Any]:
    with _refused_as_http():
        accounts.set_password(state.database, name, body.password, actor=who.name)
    return _answer(state, name)


@router.put("/users/{name}/role", summary="Change a user's role")
def set_role(name: str, body: RoleBody, state: State, who: Admin) -> dict[str, Any]:
    with _refused_as_http():
        accounts.set_role(state.database, name, body.role, actor=who.name)
    return _answer(state, name)


@router.post("/users/{name}/disable", summary="Refuse a user's logins and tokens")
def disable(name: str, state: State, who: Admin) -> dict[str, Any]:
    with _refused_as_http():
        accounts.set_disabled(state.database, name, True, actor=who.name)
    return _answer(state, name)


@router.post("/users/{name}/enable", summary="Let a disabled user in again")
def enable(name: str, state: State, who: Admin) -> dict[str, Any]:
    with _refused_as_http():
        accounts.set_disabled(state.database, name, False, actor=who.name)
    return _answer(state, name)


@router.post("/users/{name}/unlock", summary="Clear the login throttle's failures of a name")
def unlock(name: str, state: State, who: Admin) -> dict[str, Any]:
    cleared = accounts.unlock(state.database, name, actor=who.name)
    return {"name": name, "cleared": cleared}


@router.delete("/users/{name}/tokens", summary="Revoke every API token of a user")
def revoke_tokens(name: str, state: State, who: Admin) -> dict[str, Any]:
    with _refused_as_http():
        revoked = accounts.revoke_tokens(state.database, name, actor=who.name)
    return {"name": name, "revoked": revoked}


@router.delete("/users/{name}/tokens/{token_id}", summary="Revoke one API token")
def revoke_token(name: str, token_id: int, state: State, who: Admin) -> dict[str, Any]:
    try:
        revoked = accounts.revoke_tokens(state.database, name, actor=who.name,
                                         token_id=token_id)
    except UserError as exc:  # an unknown user, or a token that is not theirs
        raise HTTPException(404, str(exc)) from exc
    return {"name": name, "revoked": revoked}


@router.delete("/users/{name}", summary="Remove a user with their tokens and sessions")
def remove(name: str, state: State, who: Admin) -> dict[str, Any]:
    with _refused_as_http():
        accounts.remove(state.database, name, actor=who.name)
    return {"name": name, "removed": True}

"""User administration: password, role, disable/enable, remove, unlock, token revocation.

The same functions serve `dicomnode users ...` and the console's users page (API under
/api/users); every change is one transaction with its audit row naming who did it. A disabled
user cannot log in, their open sessions end and their API tokens stop working (auth checks
`disabled` on every request). The last enabled administrator cannot be demoted, disabled or
removed, so the console always has someone who can administer it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from dicomnode.db.audit import record
from dicomnode.db.engine import Database
from dicomnode.db.models import ApiToken, LoginFailure, User, UserRole, WebSession, utcnow
from dicomnode.errors import UserError
from dicomnode.timefmt import iso_utc
from dicomnode.web import auth, login_throttle
from dicomnode.web.login_throttle import LoginLimits

logger = logging.getLogger(__name__)


class UserNotFound(UserError):
    """No user by that name."""


class LastAdmin(UserError):
    """The change would leave no enabled administrator."""


def _iso(value: datetime | None) -> str | None:
    return iso_utc(value)


@dataclass(frozen=True)
class TokenInfo:
    id: int
    created_at: str | None
    last_used_at: str | None


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    disabled: bool
    created_at: str | None
    tokens: tuple[TokenInfo, ...]
    failed_logins: int  # within the throttle window
    locked_for: int | None  # seconds until a login may be tried again, None if it may now

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name, "role": self.role, "disabled": self.disabled,
            "created_at": self.created_at, "api_tokens": len(self.tokens),
            "tokens": [t.__dict__ for t in self.tokens],
            "failed_logins": self.failed_logins, "locked_for": self.locked_for,
        }


def _user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserNotFound(f"no user '{name}'")
    return user


def _other_admins(session: Session, user: User) -> int:
    return int(session.scalar(
        select(func.count()).select_from(User).where(
            User.role == UserRole.ADMIN, User.disabled.is_(False), User.id != user.id)) or 0)


def _keep_an_admin(session: Session, user: User, action: str) -> None:
    if user.role == UserRole.ADMIN and not user.disabled and _other_admins(session, user) == 0:
        raise LastAdmin(f"cannot {action} '{user.name}': it is the only enabled administrator "
                        "(make another one first)")


def _end_sessions(session: Session, user: User) -> int:
    result = session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    return int(getattr(result, "rowcount", 0) or 0)


def list_accounts(database: Database, limits: LoginLimits | None = None) -> list[Account]:
    with database.transaction() as session:
        now = utcnow()
        tokens: dict[int, list[TokenInfo]] = {}
        for t in session.scalars(select(ApiToken).order_by(ApiToken.id)):
            tokens.setdefault(t.user_id, []).append(
                TokenInfo(t.id, _iso(t.created_at), _iso(t.last_used_at)))
        out = []
        for user in session.scalars(select(User).order_by(User.name)):
            failures, locked = 0, None
            if limits is not None:
                failures = int(session.scalar(
                    select(func.count()).select_from(LoginFailure).where(
                        LoginFailure.user_name == user.name[:login_throttle.NAME_WIDTH],
                        LoginFailure.at >= now - limits.window)) or 0)
                locked = login_throttle.retry_after(session, user.name, None, limits, now)
            out.append(Account(user.name, user.role, bool(user.disabled),
                               _iso(user.created_at), tuple(tokens.get(user.id, ())),
                               failures, locked))
        return out


def set_password(database: Database, name: str, password: str, *, actor: str) -> None:
    """A new password; the user's open console sessions end (API tokens stay)."""
    if len(password) < auth.MIN_PASSWORD:
        raise UserError(f"the password must be at least {auth.MIN_PASSWORD} characters")
    with database.transaction() as session:
        user = _user(session, name)
        user.password_hash = auth.hash_password(password)
        ended = _end_sessions(session, user)
        record(session, "user-password", actor=actor,
               detail=f"password of {name} changed; {ended} console session(s) ended")


def set_role(database: Database, name: str, role: str, *, actor: str) -> bool:
    """False when the user has that role already (nothing changes, nothing audited)."""
    if role not in UserRole.ALL:
        raise UserError(f"role '{role}' is not one of {', '.join(UserRole.ALL)}")
    with database.transaction() as session:
        user = _user(session, name)
        if user.role == role:
            return False
        if role != UserRole.ADMIN:
            _keep_an_admin(session, user, "demote")
        before, user.role = user.role, role
        record(session, "user-role", actor=actor, detail=f"user {name}: {before} -> {role}")
        return True


def set_disabled(database: Database, name: str, disabled: bool, *, actor: str) -> bool:
    """Disable (sessions end, tokens stop working, logins refused) or enable a user.
    False when nothing changes."""
    with database.transaction() as session:
        user = _user(session, name)
        if bool(user.disabled) == disabled:
            return False
        if disabled:
            _keep_an_admin(session, user, "disable")
        user.disabled = disabled
        ended = _end_sessions(session, user) if disabled else 0
        record(session, "user-disable" if disabled else "user-enable", actor=actor,
               detail=f"user {name} {'disabled' if disabled else 'enabled'}"
                      + (f"; {ended} console session(s) ended" if disabled else ""))
        return True


def remove(database: Database, name: str, *, actor: str) -> None:
    """Delete the user with their tokens and sessions (their audit rows stay)."""
    with database.transaction() as session:
        user = _user(session, name)
        _keep_an_admin(session, user, "remove")
        tokens = session.execute(delete(ApiToken).where(ApiToken.user_id == user.id))
        _end_sessions(session, user)
        session.delete(user)
        record(session, "user-remove", actor=actor,
               detail=f"user {name} ({user.role}) removed with "
                      f"{int(getattr(tokens, 'rowcount', 0) or 0)} API token(s)")


def unlock(database: Database, name: str, *, actor: str) -> int:
    """Clear the login throttle's failures for this name; returns how many were cleared.
    Works for a name with no account too (the throttle counts names, not accounts)."""
    with database.transaction() as session:
        result = session.execute(delete(LoginFailure).where(
            LoginFailure.user_name == name[:login_throttle.NAME_WIDTH]))
        cleared = int(getattr(result, "rowcount", 0) or 0)
        record(session, "user-unlock", actor=actor,
               detail=f"login failures of {name} cleared ({cleared})")
        return cleared


def revoke_tokens(database: Database, name: str, *, actor: str,
                  token_id: int | None = None) -> int:
    """Revoke every API token of a user, or the one with `token_id`; returns how many."""
    with database.transaction() as session:
        user = _user(session, name)
        query = delete(ApiToken).where(ApiToken.user_id == user.id)
        if token_id is not None:
            query = query.where(ApiToken.id == token_id)
        result = session.execute(query)
        revoked = int(getattr(result, "rowcount", 0) or 0)
        if token_id is not None and revoked == 0:
            raise UserError(f"user '{name}' has no API token {token_id}")
        which = f"token {token_id}" if token_id is not None else f"{revoked} token(s)"
        record(session, "token-revoke", actor=actor, detail=f"API {which} of {name} revoked")
        return revoked

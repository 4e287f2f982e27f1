"""Users, password hashes, API tokens and console sessions.

Passwords: scrypt with a per-user random salt, parameters stored with the hash so they can be
raised later. API tokens and session secrets are random; only their SHA-256 is stored, so a
copy of the database does not let anyone log in. There is no default user or password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select

from dicomnode.db.audit import record
from dicomnode.db.engine import Database
from dicomnode.db.models import ApiToken, User, UserRole, WebSession, as_utc, utcnow
from dicomnode.errors import UserError
from dicomnode.web import login_throttle
from dicomnode.web.login_throttle import LoginLimits, LoginThrottled

logger = logging.getLogger(__name__)

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
TOKEN_PREFIX = "dn_"


@dataclass(frozen=True)
class Principal:
    """Who made a request, and how they proved it (`csrf` is set for console sessions)."""

    user_id: int
    name: str
    role: str
    via: str  # "token" | "session"
    csrf: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"), salt=base64.b64decode(salt),
            n=int(n), r=int(r), p=int(p), dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def add_user(database: Database, name: str, role: str, password: str) -> int:
    if not USER_NAME.match(name):
        raise UserError(f"'{name}' is not a user name: letters, digits and . _ @ -, 1-64")
    if role not in UserRole.ALL:
        raise UserError(f"role '{role}' is not one of {', '.join(UserRole.ALL)}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must be at least {MIN_PASSWORD} characters")
    with database.transaction() as session:
        if session.scalar(select(User.id).where(User.name == name)) is not None:
            raise UserError(f"user '{name}' already exists")
        user = User(name=name, role=role, password_hash=hash_password(password))
        session.add(user)
        session.flush()
        record(session, "user-add", actor="cli", detail=f"user {name} role {role}")
        return user.id


def issue_token(database: Database, name: str) -> str:
    """A new API token for a user; printed once, only its hash is kept."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with database.transaction() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise UserError(f"no user '{name}' (add one with: dicomnode users add {name})")
        session.add(ApiToken(user_id=user.id, token_hash=secret_hash(token)))
        record(session, "token-issue", actor="cli", detail=f"API token for {name}")
    return token


def principal_for_token(database: Database, token: str) -> Principal | None:
    with database.transaction() as session:
        row = session.execute(
            select(ApiToken, User).join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == secret_hash(token))
        ).first()
        if row is None or row[1].disabled:
            return None
        api_token, user = row
        api_token.last_used_at = utcnow()
        return Principal(user.id, user.name, user.role, "token")


def login(
    database: Database, name: str, password: str, minutes: int, *,
    address: str | None = None, limits: LoginLimits | None = None,
) -> tuple[str, Principal]:
    """Check the password and open a session; returns (cookie secret, principal).

    With `limits`, a name or address with too many recent failures is refused before the
    password is looked at (LoginThrottled); each failure is counted in the database.
    """
    actor = name[:login_throttle.NAME_WIDTH]
    peer = address[:login_throttle.ADDRESS_WIDTH] if address else None
    attempt: int | None = None
    if limits is not None:
        # Check and count in one serialised transaction: the attempt is counted as a
        # failure before the password is looked at (and forgiven if it is right), so a
        # parallel burst gets exactly the limit, not one more per request in flight.
        with database.transaction() as session:
            login_throttle.serialise(session)
            now = utcnow()
            wait = login_throttle.retry_after(session, name, address, limits, now)
            if wait is not None:
                # The refusal is on record even though no login happens.
                record(session, "login-throttled", actor=actor, peer=peer,
                       detail=f"refused unchecked for {wait} s (too many failed logins)")
            else:
                attempt = login_throttle.add_failure(session, name, address, now)
        if wait is not None:
            logger.warning("console login throttled for user name %r from %s", actor, peer)
            raise LoginThrottled(wait)
    with database.transaction() as session:
        user = session.scalar(select(User).where(User.name == name))
        # Hash even for an unknown user, so response time does not reveal which names exist.
        ok = verify_password(password, user.password_hash if user else hash_password("x"))
        refused = user is None or not ok or user.disabled
    if refused or user is None:
        # Its own transaction: the refusal must be on record even though nothing else is.
        with database.transaction() as session:
            record(session, "login-failed", actor=actor, peer=peer)  # counted already
        logger.warning("console login refused for user name %r from %s", actor, peer)
        raise UserError("wrong user name or password")
    with database.transaction() as session:
        secret = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        now = utcnow()
        # Expired sessions are removed on the way: the table stays small without a timer.
        session.execute(delete(WebSession).where(WebSession.expires_at < now))
        session.add(WebSession(
            user_id=user.id, token_hash=secret_hash(secret), csrf_token=csrf,
            created_at=now, expires_at=now + timedelta(minutes=minutes),
        ))
        login_throttle.clear_name(session, user.name)
        if attempt is not None:
            login_throttle.forget(session, attempt)
        record(session, "login", actor=user.name, peer=peer)
        return secret, Principal(user.id, user.name, user.role, "session", csrf)


def record_refusal(database: Database, kind: str, name: str, address: str | None,
                   detail: str) -> None:
    """Audit a login refused before any check (e.g. a cross-site form post)."""
    with database.transaction() as session:
        record(session, kind, actor=name[:login_throttle.NAME_WIDTH],
               peer=address[:login_throttle.ADDRESS_WIDTH] if address else None,
               detail=detail[:2000])
    logger.warning("console login refused (%s) from %s", kind, address)


def principal_for_session(database: Database, secret: str) -> Principal | None:
    with database.transaction() as session:
        row = session.execute(
            select(WebSession, User).join(User, User.id == WebSession.user_id)
            .where(WebSession.token_hash == secret_hash(secret))
        ).first()
        if row is None:
            return None
        web_session, user = row
        if as_utc(web_session.expires_at) <= utcnow() or user.disabled:
            return None
        return Principal(user.id, user.name, user.role, "session", web_session.csrf_token)


def logout(database: Database, secret: str) -> None:
    with database.transaction() as session:
        session.execute(delete(WebSession).where(WebSession.token_hash == secret_hash(secret)))

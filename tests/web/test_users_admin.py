"""User administration: `dicomnode users passwd|role|remove|disable|enable|unlock|revoke-tokens`
and /api/users (admin only); every change audited; disabled users and revoked tokens are out."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dicomnode.cli import main
from dicomnode.db.models import AuditEvent, User
from dicomnode.errors import UserError
from dicomnode.web import auth
from dicomnode.web.login_throttle import LoginLimits, LoginThrottled
from tests.web.conftest import ADMIN_PASSWORD, VIEWER_PASSWORD, Env


def _cli(env: Env, *args: str) -> int:
    return main(["users", *args, "--config", str(env.root / "dicomnode.yaml")])


def _audit(env: Env, kind: str) -> list[AuditEvent]:
    with env.database.transaction() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind)))


def test_cli_password_role_disable_remove(
    env: Env, client: TestClient, monkeypatch: pytest.MonkeyPatch, capsys: Any,
) -> None:
    viewer = {"Authorization": f"Bearer {env.viewer_token}"}
    secret, _ = auth.login(env.database, "victor", VIEWER_PASSWORD, 60)
    monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password-2\n"))
    assert _cli(env, "passwd", "victor", "--password-stdin") == 0
    with pytest.raises(UserError):
        auth.login(env.database, "victor", VIEWER_PASSWORD, 60)
    auth.login(env.database, "victor", "a-new-password-2", 60)
    assert auth.principal_for_session(env.database, secret) is None  # old session ended
    [event] = _audit(env, "user-password")
    assert str(event.actor).startswith("cli:") and "victor" in str(event.detail)

    assert _cli(env, "role", "victor", "admin") == 0
    assert client.get("/api/users", headers=viewer).status_code == 200  # now an admin
    assert _cli(env, "role", "victor", "viewer") == 0
    assert client.get("/api/users", headers=viewer).status_code == 403
    assert [e.detail for e in _audit(env, "user-role")] == [
        "user victor: viewer -> admin", "user victor: admin -> viewer"]

    assert _cli(env, "disable", "victor") == 0
    assert client.get("/api/models", headers=viewer).status_code == 401
    with pytest.raises(UserError):
        auth.login(env.database, "victor", "a-new-password-2", 60)
    assert _cli(env, "enable", "victor") == 0
    assert client.get("/api/models", headers=viewer).status_code == 200

    # The only administrator cannot be demoted, disabled or removed.
    capsys.readouterr()
    for args in (("role", "alice", "viewer"), ("disable", "alice"), ("remove", "alice")):
        assert _cli(env, *args) == 2
        assert "only enabled administrator" in capsys.readouterr().err
    assert _cli(env, "remove", "victor") == 0
    assert client.get("/api/models", headers=viewer).status_code == 401
    with env.database.transaction() as session:
        assert session.scalars(select(User.name)).all() == ["alice"]
    assert _cli(env, "remove", "victor") == 2  # no such user


def test_cli_revokes_tokens_all_or_one(env: Env, client: TestClient, capsys: Any) -> None:
    second = auth.issue_token(env.database, "victor")
    first = {"Authorization": f"Bearer {env.viewer_token}"}
    other = {"Authorization": f"Bearer {second}"}
    capsys.readouterr()
    assert _cli(env, "list", "--json") == 0
    [victor] = [u for u in json.loads(capsys.readouterr().out) if u["name"] == "victor"]
    assert victor["api_tokens"] == 2
    assert _cli(env, "revoke-tokens", "victor", "--token", str(victor["tokens"][0]["id"])) == 0
    assert client.get("/api/models", headers=first).status_code == 401
    assert client.get("/api/models", headers=other).status_code == 200
    assert _cli(env, "revoke-tokens", "victor") == 0
    assert client.get("/api/models", headers=other).status_code == 401
    assert len(_audit(env, "token-revoke")) == 2


def test_unlock_clears_the_login_throttle_for_the_name(env: Env) -> None:
    limits = LoginLimits.from_settings(env.settings.web)
    for _ in range(limits.per_user):
        with pytest.raises(UserError):
            auth.login(env.database, "alice", "wrong password", 60, address="10.0.0.9",
                       limits=limits)
    with pytest.raises(LoginThrottled):
        auth.login(env.database, "alice", ADMIN_PASSWORD, 60, limits=limits)
    assert _cli(env, "unlock", "alice") == 0
    auth.login(env.database, "alice", ADMIN_PASSWORD, 60, limits=limits)
    [event] = _audit(env, "user-unlock")
    assert f"({limits.per_user})" in str(event.detail)


def test_api_users_admin_only_and_audited(
    client: TestClient, admin: dict[str, str], viewer: dict[str, str], env: Env,
) -> None:
    assert client.get("/api/users", headers=viewer).status_code == 403
    assert client.post("/api/users/alice/disable", headers=viewer).status_code == 403
    users = client.get("/api/users", headers=admin).json()["users"]
    assert [(u["name"], u["role"], u["disabled"]) for u in users] == [
        ("alice", "admin", False), ("victor", "viewer", False)]
    assert client.post("/api/users/victor/disable", headers=admin).json()["disabled"] is True
    assert client.get("/api/models", headers=viewer).status_code == 401
    assert client.post("/api/users/victor/enable", headers=admin).json()["disabled"] is False
    assert client.put("/api/users/victor/role", headers=admin,
                      json={"role": "root"}).status_code == 422
    assert client.put("/api/users/alice/role", headers=admin,
                      json={"role": "viewer"}).status_code == 409
    assert client.post("/api/users/victor/password", headers=admin,
                       json={"password": "short"}).status_code == 422
    assert client.post("/api/users/nobody/disable", headers=admin).status_code == 404
    assert client.delete("/api/users/victor/tokens/99999", headers=admin).status_code == 404
    assert client.delete("/api/users/victor/tokens", headers=admin).json()["revoked"] == 1
    assert client.delete("/api/users/victor", headers=admin).status_code == 200
    kinds = [(e.kind, e.actor) for e in _audit(env, "user-disable") + _audit(env, "user-enable")
             + _audit(env, "token-revoke") + _audit(env, "user-remove")]
    assert kinds == [("user-disable", "alice"), ("user-enable", "alice"),
                     ("token-revoke", "alice"), ("user-remove", "alice")]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/users"), ("POST", "/api/users/alice/password"),
    ("PUT", "/api/users/alice/role"), ("POST", "/api/users/alice/disable"),
    ("POST", "/api/users/alice/enable"), ("POST", "/api/users/alice/unlock"),
    ("DELETE", "/api/users/alice/tokens"), ("DELETE", "/api/users/alice/tokens/1"),
    ("DELETE", "/api/users/alice"), ("POST", "/api/studies/1.2.3/rerun"),
])
def test_new_endpoints_refuse_without_credentials(
    client: TestClient, method: str, path: str
) -> None:
    assert client.request(method, path).status_code == 401

"""Password hashing, tokens stored hashed, and `dicomnode users add|token`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select

from dicomnode.cli import main
from dicomnode.db import open_database
from dicomnode.db.models import ApiToken, User
from dicomnode.errors import UserError
from dicomnode.web import auth
from dicomnode.web.app import create_app
from dicomnode.web.state import CatalogHolder, WebState


def test_password_hash_is_salted_and_verifies() -> None:
    first, second = auth.hash_password("correct horse"), auth.hash_password("correct horse")
    assert first != second  # per-user salt
    assert first.startswith("scrypt$") and "correct horse" not in first
    assert auth.verify_password("correct horse", first)
    assert not auth.verify_password("correct horsE", first)
    assert not auth.verify_password("x", "garbage")


def test_add_user_refusals(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        auth.add_user(database, "ann", "admin", "long-enough-pw")
        with pytest.raises(UserError, match="already exists"):
            auth.add_user(database, "ann", "viewer", "long-enough-pw")
        with pytest.raises(UserError, match="at least"):
            auth.add_user(database, "bob", "viewer", "short")
        with pytest.raises(UserError, match="role"):
            auth.add_user(database, "bob", "root", "long-enough-pw")
        with pytest.raises(UserError, match="no user"):
            auth.issue_token(database, "nobody")
    finally:
        database.dispose()


def test_cli_adds_user_and_prints_a_working_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "presets").mkdir()
    (tmp_path / "model_registry").mkdir()
    config = tmp_path / "dicomnode.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": "sqlite:///node.db"}, "registry": {"path": "model_registry"},
        "presets": {"path": "presets"}, "storage": {"path": "storage"},
    }), "utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO("a-secret-password\n"))
    assert main(["users", "add", "carol", "--role", "viewer", "--password-stdin",
                 "--config", str(config)]) == 0
    assert main(["users", "token", "carol", "--config", str(config)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("dn_")
    assert main(["users", "token", "dave", "--config", str(config)]) == 2
    capsys.readouterr()
    assert main(["users", "list", "--json", "--config", str(config)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(u["name"], u["role"], u["api_tokens"]) for u in listed] == [("carol", "viewer", 1)]
    from dicomnode.settings import load_settings
    settings = load_settings(config)
    database = open_database(settings.database.url)
    try:
        with database.transaction() as session:
            user = session.scalars(select(User)).one()
            stored = session.scalars(select(ApiToken.token_hash)).one()
        assert user.role == "viewer" and "a-secret-password" not in user.password_hash
        assert stored != token and stored == auth.secret_hash(token)
        app = create_app(WebState(settings, database, CatalogHolder(settings)))
        with TestClient(app) as client:
            headers = {"Authorization": f"Bearer {token}"}
            assert client.get("/api/models", headers=headers).status_code == 200
    finally:
        database.dispose()

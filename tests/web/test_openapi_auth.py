"""The OpenAPI document is for signed-in principals only (bearer token or console session)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.web.conftest import VIEWER_PASSWORD


def test_openapi_needs_a_signed_in_principal(client: TestClient, viewer: dict[str, str],
                                             admin: dict[str, str]) -> None:
    anonymous = client.get("/api/openapi.json")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert "paths" not in anonymous.text
    bad = client.get("/api/openapi.json", headers={"Authorization": "Bearer dn_guess"})
    assert bad.status_code == 401
    for headers in (viewer, admin):
        ok = client.get("/api/openapi.json", headers=headers)
        assert ok.status_code == 200 and "/api/presets" in ok.json()["paths"]
    # Not listed in itself, and no open docs page either.
    assert "/api/openapi.json" not in ok.json()["paths"]
    assert client.get("/api/docs").status_code == 404


def test_openapi_with_the_console_session(client: TestClient) -> None:
    login = client.post("/login", data={"username": "victor", "password": VIEWER_PASSWORD},
                        follow_redirects=False)
    assert login.status_code == 303
    assert client.get("/api/openapi.json").json()["info"]["title"] == "dicomnode"

"""Login throttling: failures per user name and per address, kept in the database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from dicomnode.db import open_database
from dicomnode.db.models import AuditEvent, LoginFailure
from dicomnode.web import auth
from dicomnode.web.app import create_app
from dicomnode.web.deps import SESSION_COOKIE
from dicomnode.web.state import WebState
from tests.web.conftest import ADMIN_PASSWORD, VIEWER_PASSWORD, Env, make_env

WRONG = "not-the-password-7"


def _post(client: TestClient, name: str, password: str) -> httpx.Response:
    response: httpx.Response = client.post(
        "/login", data={"username": name, "password": password}, follow_redirects=False)
    return response


def _fail(client: TestClient, name: str, times: int) -> None:
    for _ in range(times):
        response = _post(client, name, WRONG)
        assert response.status_code == 401, response.text
        assert "wrong user name or password" in response.text


def _assert_throttled(response: httpx.Response, minutes: int) -> None:
    assert response.status_code == 429, response.text
    assert SESSION_COOKIE not in response.cookies
    assert f"Too many failed sign-ins; try again in {minutes} minutes" in response.text
    retry_after = int(response.headers["Retry-After"])
    assert (minutes - 1) * 60 < retry_after <= minutes * 60


def _client(app: FastAPI, address: str) -> TestClient:
    return TestClient(app, client=(address, 40000))


def test_five_wrong_passwords_then_the_right_one_is_refused(client: TestClient,
                                                            env: Env) -> None:
    _fail(client, "alice", 5)
    _assert_throttled(_post(client, "alice", ADMIN_PASSWORD), 15)
    # Still refused, and refusals do not count: the lock ends with the first failures' window.
    _assert_throttled(_post(client, "alice", ADMIN_PASSWORD), 15)
    with env.database.transaction() as session:
        assert len(session.scalars(select(LoginFailure)).all()) == 5
        events = session.execute(
            select(AuditEvent.kind, AuditEvent.actor, AuditEvent.peer, AuditEvent.detail)
            .where(AuditEvent.kind.in_(["login-failed", "login-throttled"]))
            .order_by(AuditEvent.id)).all()
    assert [e.kind for e in events] == ["login-failed"] * 5 + ["login-throttled"] * 2
    assert {(e.actor, e.peer) for e in events} == {("alice", "testclient")}
    for event in events:
        assert WRONG not in (event.detail or "") and ADMIN_PASSWORD not in (event.detail or "")


def test_another_user_is_unaffected_and_the_lock_ends_with_the_window(
    client: TestClient, env: Env
) -> None:
    _fail(client, "alice", 5)
    assert _post(client, "alice", ADMIN_PASSWORD).status_code == 429
    assert _post(client, "victor", VIEWER_PASSWORD).status_code == 303
    # The window passes (the rows are moved back instead of the test waiting 15 minutes).
    with env.database.transaction() as session:
        session.execute(update(LoginFailure).values(
            at=LoginFailure.at - timedelta(minutes=15, seconds=1)))
    assert _post(client, "alice", ADMIN_PASSWORD).status_code == 303
    with env.database.transaction() as session:
        assert session.scalars(select(LoginFailure)).all() == []  # old rows pruned


def test_success_clears_the_names_count(client: TestClient, env: Env) -> None:
    _fail(client, "alice", 4)
    assert _post(client, "alice", ADMIN_PASSWORD).status_code == 303
    with env.database.transaction() as session:
        assert session.scalars(select(LoginFailure.user_name)).all() == []
    _fail(client, "alice", 4)  # a count of 8 without the clearing would be refused here
    assert _post(client, "alice", ADMIN_PASSWORD).status_code == 303


def test_one_address_is_limited_other_addresses_are_not(tmp_path: Path) -> None:
    env = make_env(tmp_path, {"port": 0, "login_max_failures_per_address": 3,
                              "login_window_minutes": 10})
    try:
        app = create_app(env.state)
        with _client(app, "192.0.2.7") as guesser, _client(app, "192.0.2.8") as other:
            for name in ("nobody", "root", "admin"):  # one failure each: no name is locked
                _fail(guesser, name, 1)
            _assert_throttled(_post(guesser, "victor", VIEWER_PASSWORD), 10)
            assert _post(other, "victor", VIEWER_PASSWORD).status_code == 303
        with env.database.transaction() as session:
            peers = session.scalars(select(AuditEvent.peer).where(
                AuditEvent.kind == "login-throttled")).all()
        assert peers == ["192.0.2.7"]
    finally:
        env.database.dispose()


def test_failures_survive_a_new_app_on_the_same_database(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    try:
        with TestClient(create_app(env.state)) as first:
            _fail(first, "alice", 5)
    finally:
        env.database.dispose()
    database = open_database(env.settings.database.url)  # as after a restart
    try:
        state = WebState(env.settings, database, env.state.catalog)
        with TestClient(create_app(state)) as second:
            _assert_throttled(_post(second, "alice", ADMIN_PASSWORD), 15)
    finally:
        database.dispose()


@pytest.fixture
def shared_env(tmp_path: Path, db_url: str) -> Iterator[tuple[Env, str]]:
    env = make_env(tmp_path)
    yield env, db_url
    env.database.dispose()


def test_two_nodes_on_one_database_share_the_count(shared_env: tuple[Env, str]) -> None:
    env, url = shared_env
    one, two = open_database(url), open_database(url)
    try:
        auth.add_user(one, "alice", "admin", ADMIN_PASSWORD)
        node_one = create_app(WebState(env.settings, one, env.state.catalog))
        node_two = create_app(WebState(env.settings, two, env.state.catalog))
        with _client(node_one, "192.0.2.1") as a, _client(node_two, "192.0.2.2") as b:
            _fail(a, "alice", 3)
            _fail(b, "alice", 2)
            _assert_throttled(_post(a, "alice", ADMIN_PASSWORD), 15)
            _assert_throttled(_post(b, "alice", ADMIN_PASSWORD), 15)
    finally:
        one.dispose()
        two.dispose()


def test_a_parallel_burst_gets_exactly_the_limit(shared_env: tuple[Env, str]) -> None:
    """12 wrong passwords at once: 5 are checked (and fail), every other one is throttled."""
    import threading

    from dicomnode.errors import UserError
    from dicomnode.web.login_throttle import LoginLimits, LoginThrottled

    _, url = shared_env
    database = open_database(url)
    try:
        auth.add_user(database, "alice", "admin", ADMIN_PASSWORD)
        limits = LoginLimits(per_user=5, per_address=1000, window=timedelta(minutes=15))
        barrier = threading.Barrier(12)
        outcomes: list[str] = []
        lock = threading.Lock()

        def attempt(index: int) -> None:
            barrier.wait()
            try:
                auth.login(database, "alice", WRONG, 60, address=f"192.0.2.{index}",
                           limits=limits)
                outcome = "in"
            except LoginThrottled:
                outcome = "throttled"
            except UserError:
                outcome = "checked"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["checked"] * 5 + ["throttled"] * 7
        with database.transaction() as session:
            failures = session.scalars(select(LoginFailure.id)).all()
        assert len(failures) == 5
    finally:
        database.dispose()


def _serve(env: Env) -> tuple[object, str]:
    from dicomnode.web.server import WebServer

    server = WebServer(env.state, env.settings.web)
    host, port = server.start()
    return server, f"http://{host}:{port}"


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_for_counts_only_from_a_trusted_proxy(tmp_path: Path, trusted: bool) -> None:
    web: dict[str, object] = {"port": 0, "login_max_failures_per_address": 3}
    if trusted:
        web["trusted_proxies"] = ["127.0.0.1"]
    env = make_env(tmp_path, web)
    server, base = _serve(env)
    try:
        with httpx.Client(base_url=base, follow_redirects=False) as http:
            for index, name in enumerate(("nobody", "root", "admin", "victor")):
                response = http.post("/login", data={"username": name, "password": WRONG},
                                     headers={"X-Forwarded-For": f"198.51.100.{index}"})
                if index < 3:
                    assert response.status_code == 401
        with env.database.transaction() as session:
            peers = session.scalars(select(AuditEvent.peer)
                                    .where(AuditEvent.kind.like("login-%"))
                                    .order_by(AuditEvent.id)).all()
        if trusted:  # the proxy's word is taken: four addresses, none over its limit
            assert response.status_code == 401
            assert peers == [f"198.51.100.{i}" for i in range(4)]
        else:  # one address (the real peer), locked after three failures
            assert response.status_code == 429
            assert set(peers) == {"127.0.0.1"}
    finally:
        server.stop()  # type: ignore[attr-defined]
        env.database.dispose()


def test_a_cross_site_login_post_is_refused(client: TestClient, env: Env) -> None:
    evil = client.post("/login", data={"username": "alice", "password": ADMIN_PASSWORD},
                       headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert evil.status_code == 403 and SESSION_COOKIE not in evil.cookies
    fetch = client.post("/login", data={"username": "alice", "password": ADMIN_PASSWORD},
                        headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False)
    assert fetch.status_code == 403 and SESSION_COOKIE not in fetch.cookies
    own = client.post("/login", data={"username": "alice", "password": ADMIN_PASSWORD},
                      headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
                      follow_redirects=False)
    assert own.status_code == 303 and SESSION_COOKIE in own.cookies
    with env.database.transaction() as session:
        kinds = session.scalars(select(AuditEvent.kind).where(
            AuditEvent.kind.like("login%")).order_by(AuditEvent.id)).all()
    assert kinds == ["login-cross-site", "login-cross-site", "login"]

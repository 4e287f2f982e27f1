"""The console over HTTPS (`web.tls`) in headless Chromium: certificates made in the test, the
session cookie marked Secure, the API reached over TLS; a bad key stops the start."""

from __future__ import annotations

import re
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomnode.errors import ConfigError
from dicomnode.web.deps import SESSION_COOKIE
from dicomnode.web.server import WebServer
from tests.support.certs import Authority, make_authority
from tests.web.conftest import ADMIN_PASSWORD, Env, make_env
from tests.web.test_console_browser import chromium_context, log_in, watch

pytestmark = pytest.mark.integration


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return make_authority(tmp_path / "certs")


@pytest.fixture
def served_https(tmp_path: Path, authority: Authority) -> Iterator[tuple[Env, str]]:
    issued = authority.issue(tmp_path / "certs", "web", common_name="localhost")
    env = make_env(tmp_path / "node", web={
        "port": 0, "host": "127.0.0.1",
        "tls": {"certificate": str(issued.certificate), "private_key": str(issued.private_key)},
    })
    server = WebServer(env.state, env.settings.web)
    _, port = server.start()
    try:
        yield env, f"https://127.0.0.1:{port}"
    finally:
        server.stop()
        env.database.dispose()


@pytest.fixture
def https_browser(tmp_path: Path) -> Iterator[Any]:
    # The test CA is not in Chromium's store; the API check below verifies it instead.
    with chromium_context(tmp_path / "profile", ignore_https_errors=True) as context:
        yield context


def test_console_over_https_sets_a_secure_session_cookie(
    served_https: tuple[Env, str], https_browser: Any, authority: Authority
) -> None:
    env, base = served_https
    page = https_browser.new_page()
    problems = watch(page)
    log_in(page, base, "alice", ADMIN_PASSWORD)
    assert page.url.startswith("https://")
    cookie = next(c for c in https_browser.cookies() if c["name"] == SESSION_COOKIE)
    assert cookie["secure"] is True and cookie["httpOnly"] is True
    page.click("#preset-centres")
    page.wait_for_selector('#graph g.node[data-model="mask-centre"]')
    assert not problems, problems
    # An API client that trusts the hospital CA verifies the node's certificate.
    context = ssl.create_default_context(cafile=str(authority.certificate))
    request = urllib.request.Request(f"{base}/api/presets",
                                     headers={"Authorization": f"Bearer {env.admin_token}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        assert response.status == 200
    # Plain HTTP to the HTTPS port gets no page.
    plain = re.sub("^https", "http", base)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{plain}/login", timeout=10).read()


def test_mismatched_web_key_names_the_key_and_file(tmp_path: Path, authority: Authority) -> None:
    one = authority.issue(tmp_path / "certs", "one", common_name="localhost")
    two = authority.issue(tmp_path / "certs", "two", common_name="localhost")
    env = make_env(tmp_path / "node", web={
        "port": 0, "tls": {"certificate": str(one.certificate),
                           "private_key": str(two.private_key)}})
    try:
        with pytest.raises(ConfigError, match=re.escape(
                f"web.tls.private_key: {two.private_key} does not match the certificate "
                f"{one.certificate}")):
            WebServer(env.state, env.settings.web)
    finally:
        env.database.dispose()

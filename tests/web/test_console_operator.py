"""Operator work in the console, in headless Chromium (fixtures of test_console_browser):
a custom selection saved as a new preset runs the graph that was shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.cli import main
from tests.web.conftest import ADMIN_PASSWORD, Env
from tests.web.test_console_browser import (  # noqa: F401  (fixtures)
    browser_context,
    graph_nodes,
    log_in,
    reason,
    served,
    shot,
    watch,
)
from tests.web.test_saved_selection import FRACTIONS

pytestmark = pytest.mark.integration


def test_saved_selection_is_the_graph_shown(
    served: tuple[Env, str], browser_context: Any, capsys: Any,  # noqa: F811
) -> None:
    env, base = served
    (env.presets_dir / "fractions.yaml").write_text(yaml.safe_dump(FRACTIONS), "utf-8")
    env.state.catalog.reload()
    page = browser_context.new_page()
    problems = watch(page)
    log_in(page, base, "alice", ADMIN_PASSWORD)
    page.goto(f"{base}/presets/fractions")
    page.wait_for_selector('#graph g.node[data-model="green-seg"]')
    page.uncheck("#toggle-green-seg input")
    page.wait_for_selector('#graph g.node[data-model="green-seg-alt"]')
    shown = graph_nodes(page)
    assert shown == ["green-quality", "green-seg-alt", "mask-fraction"]
    assert reason(page, "green-seg-alt").startswith("required by mask-fraction")
    page.fill("#new-id", "fractions-alt")
    page.click("#save-new")
    page.wait_for_url(f"{base}/presets/fractions-alt")
    page.wait_for_selector('#graph g.node[data-model="green-seg-alt"]')
    assert graph_nodes(page) == shown
    saved = yaml.safe_load((env.presets_dir / "fractions-alt.yaml").read_text("utf-8"))
    assert sorted(saved["models"]) == shown
    config = str(Path(env.root) / "dicomnode.yaml")
    assert main(["graph", "--preset", "fractions-alt", "--json", "--config", config]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["models"]) == shown
    shot(page, "20-saved-selection")
    assert problems == []


def test_admin_reruns_a_study_from_its_page(
    served: tuple[Env, str], browser_context: Any,  # noqa: F811
) -> None:
    from sqlalchemy import select

    from dicomnode.db.models import AuditEvent, Job
    from tests.support.executor_fixtures import add_study

    env, base = served
    uid, _ = add_study(env.database, env.settings.storage.path, [200, 180], state="failed")
    page = browser_context.new_page()
    problems = watch(page)
    log_in(page, base, "alice", ADMIN_PASSWORD)
    page.goto(f"{base}/studies/{uid}")
    page.select_option("#rerun-preset", "centres")
    page.fill("#rerun-without", "mask-centre")
    page.fill("#rerun-with", "mask-fraction")
    page.click("#rerun-button")
    page.wait_for_selector("#message.ok:has-text('Re-run queued as job')")
    shot(page, "21-study-rerun")
    with env.database.transaction() as session:
        job = session.scalars(select(Job).where(Job.study_uid == uid)).one()
        event = session.scalars(select(AuditEvent).where(AuditEvent.kind == "study-rerun")
                                ).one()
        assert (job.preset, job.reason) == ("centres", "rerun")
        assert sorted(json.loads(job.graph_json)["models"]) == [
            "green-quality", "green-seg", "mask-fraction"]
        assert event.actor == "alice"
    # The page reloads: the study is processing, and the button says why it is disabled.
    page.wait_for_selector("#rerun-button[disabled]")
    assert problems == []


def test_viewer_has_no_rerun_button(
    served: tuple[Env, str], browser_context: Any,  # noqa: F811
) -> None:
    from tests.support.executor_fixtures import add_study
    from tests.web.conftest import VIEWER_PASSWORD

    env, base = served
    uid, _ = add_study(env.database, env.settings.storage.path, [200], state="done")
    page = browser_context.new_page()
    log_in(page, base, "victor", VIEWER_PASSWORD)
    page.goto(f"{base}/studies/{uid}")
    page.wait_for_selector("h1")
    assert page.query_selector("#rerun") is None


def test_admin_manages_users_on_the_users_page(
    served: tuple[Env, str], browser_context: Any,  # noqa: F811
) -> None:
    import urllib.error
    import urllib.request

    from dicomnode.errors import UserError
    from dicomnode.web import auth
    from dicomnode.web.login_throttle import LoginLimits
    from tests.web.conftest import VIEWER_PASSWORD

    env, base = served

    def token_works() -> bool:
        request = urllib.request.Request(
            f"{base}/api/models", headers={"Authorization": f"Bearer {env.viewer_token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError:
            return False

    limits = LoginLimits.from_settings(env.settings.web)
    for _ in range(limits.per_user):
        with pytest.raises(UserError):
            auth.login(env.database, "victor", "wrong password", 60, limits=limits)
    assert token_works()
    page = browser_context.new_page()
    problems = watch(page)
    log_in(page, base, "alice", ADMIN_PASSWORD)
    page.click("#nav-users")
    page.wait_for_selector("#user-victor")
    assert "locked" in page.inner_text("#user-victor .failures")
    shot(page, "22-users")

    page.click("#user-victor button.unlock")
    page.wait_for_selector("#message.ok")
    page.wait_for_selector("#user-victor .failures:not(:has(.badge))")
    auth.login(env.database, "victor", VIEWER_PASSWORD, 60, limits=limits)

    page.click("#user-victor button.disable")
    page.wait_for_selector("#user-victor button.enable")
    assert "disabled" in page.inner_text("#user-victor .state")
    assert not token_works()
    page.click("#user-victor button.enable")
    page.wait_for_selector("#user-victor button.disable")
    assert token_works()

    # Each change reloads the page 800 ms after its answer: the next step must act on the
    # reloaded page, not on the one about to go (a race on a loaded machine).
    with page.expect_navigation(timeout=15000):
        page.select_option("#user-victor select.role", "admin")
        page.wait_for_selector("#message.ok:has-text('victor is now admin')")
    with page.expect_navigation(timeout=15000):
        page.click("#user-victor button.revoke")
        page.wait_for_selector("#message.ok:has-text('revoked')")
    assert not token_works()
    # The only other administrator now is alice herself: demoting victor back works...
    with page.expect_navigation(timeout=15000):
        page.select_option("#user-victor select.role", "viewer")
        page.wait_for_selector("#message.ok:has-text('victor is now viewer')")
    # ... but alice, the only administrator left, cannot disable herself.
    page.wait_for_selector("#user-alice button.disable")
    page.click("#user-alice button.disable")
    page.wait_for_selector("#message.error:has-text('only enabled administrator')")
    shot(page, "23-users-changed")
    assert [p for p in problems if "409 (Conflict)" not in p] == []  # the refusal's answer

    with env.database.transaction() as session:
        from sqlalchemy import select

        from dicomnode.db.models import AuditEvent
        kinds = list(session.scalars(select(AuditEvent.kind).where(
            AuditEvent.actor == "alice", AuditEvent.kind.like("user-%") | (
                AuditEvent.kind == "token-revoke")).order_by(AuditEvent.id)))
    assert kinds == ["user-unlock", "user-disable", "user-enable", "user-role",
                     "token-revoke", "user-role"]

    viewer_page = browser_context.new_page()
    log_in(viewer_page, base, "victor", VIEWER_PASSWORD)
    assert viewer_page.query_selector("#nav-users") is None
    response = viewer_page.goto(f"{base}/users")
    assert response is not None and response.status == 403

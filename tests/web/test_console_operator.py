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

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

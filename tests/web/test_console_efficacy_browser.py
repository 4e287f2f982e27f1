"""Efficacy in the console, in headless Chromium: the models page shows each figure with its
confidence interval, the operating point, date and data hash; a model without figures is
"not measured" on the models page, in the presets list and in the preset editor's toggles,
and a preset holding one says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.web.conftest import VIEWER_PASSWORD, Env
from tests.web.test_console_browser import (  # noqa: F401 (pytest fixtures)
    browser_context,
    log_in,
    served,
    shot,
    watch,
)

pytestmark = pytest.mark.integration

SHA = "3f5a9c0e1d2b4a6f8e7d9c0b1a2f3e4d5c6b7a8f9e0d1c2b3a4f5e6d7c8b9a0f"
MEASURED = {"dataset": "Green fixtures", "split": "test", "date": "2026-11-30",
            "dataset_sha256": SHA,
            "figures": {"auc": 0.912, "auc_ci": [0.871, 0.948], "dice": 0.8}}


def _measure_green_seg(env: Env) -> None:
    """Figures for every version of green-seg; the other fixture models have none."""
    for manifest in (env.settings.registry.path / "green-seg").glob("*/manifest.yaml"):
        data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
        data["metrics"] = [MEASURED]
        manifest.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    catalog = env.state.catalog.reload("test")
    assert not catalog.registry.left_out, catalog.registry.left_out


def test_efficacy_and_not_measured_in_the_console(
    browser_context: Any, served: tuple[Env, str]  # noqa: F811
) -> None:
    env, base = served
    _measure_green_seg(env)
    page = browser_context.new_page()
    problems = watch(page)
    log_in(page, base, "victor", VIEWER_PASSWORD)

    page.goto(f"{base}/models")
    green = page.locator("#model-green-seg")
    assert "auc 0.912 (0.871\N{EN DASH}0.948)" in green.inner_text()
    assert "dice 0.8" in green.inner_text()
    assert "2026-11-30" in green.inner_text() and SHA[:12] in green.inner_text()
    assert green.locator(f"[title='sha256 {SHA}']").count() == 1
    assert "Operating point: mask ≥ 0.5" in green.inner_text()
    assert green.locator(".badge.not-measured").count() == 0
    centre = page.locator("#model-mask-centre")
    assert centre.locator("h2 .badge.not-measured").inner_text() == "not measured"
    shot(page, "models-efficacy")

    page.goto(f"{base}/presets")
    card = page.locator("#preset-centres")
    assert "mask-centre not measured" in card.inner_text()
    assert "no measured figures: green-quality, mask-centre" in card.inner_text()

    page.goto(f"{base}/presets/centres")
    page.wait_for_selector("#toggle-mask-centre")
    assert page.locator("#unmeasured-note").is_visible()
    assert page.locator("#toggle-mask-centre .badge.not-measured").count() == 1
    assert page.locator("#toggle-green-seg .badge.not-measured").count() == 0
    shot(page, "preset-not-measured")

    page.goto(f"{base}/models/green-seg")
    assert "auc 0.912 (0.871\N{EN DASH}0.948)" in page.locator("table.efficacy").inner_text()
    assert problems == []


def test_a_lone_interval_key_must_be_a_pair(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from dicomnode.registry.manifest import MetricRecord

    lone: dict[str, float | list[float]] = {"auc_ci": [0.1, 0.2]}
    MetricRecord(dataset="d", split="s", date="2026-01-01", figures=lone)
    bad_ones: list[dict[str, float | list[float]]] = [
        {"auc": [0.1, 0.2]}, {"auc_ci": [0.3, 0.2]}, {"auc_ci": [0.1]}]
    for bad in bad_ones:
        with pytest.raises(ValidationError):
            MetricRecord(dataset="d", split="s", date="2026-01-01", figures=bad)

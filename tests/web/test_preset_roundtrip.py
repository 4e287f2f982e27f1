"""Saving a preset from the console/API changes only the lines that changed: comments, key
order, flow style and the file's own spelling of unchanged values stay (diff of the text)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from dicomnode.routing.loader import parse_preset
from dicomnode.web.presets_store import edited_text
from tests.web.conftest import Env

COMMENTED = """\
# preset: presets/commented.yaml -- kept by the clinic's IT team
id: commented
name: Commented preset   # shown in the console
audience: Primary care
description: >
  A long description written by a person, folded over
  two lines on purpose.
models:
  - green-quality   # the gate first
  - mask-fraction
outputs: {sr: true, seg: true, overlay: false}
destinations: [pacs]
routing:
  modality: OP          # a single value, not a list
  calling_ae: [CAM1]
priority: 5
enabled: true
"""


def _changed(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def _put(client: TestClient, admin: dict[str, str], env: Env, **change: object) -> str:
    path = env.presets_dir / "commented.yaml"
    data = client.get("/api/presets/commented", headers=admin).json()
    body = {k: data[k] for k in ("id", "name", "audience", "description", "models",
                                 "optional_models", "outputs", "destinations", "completeness",
                                 "routing", "priority", "enabled")}
    body.update(change)
    res = client.put("/api/presets/commented", headers=admin, json=body)
    assert res.status_code == 200, res.json()
    return path.read_text("utf-8")


def test_a_change_touches_only_its_lines(
    client: TestClient, admin: dict[str, str], env: Env
) -> None:
    (env.presets_dir / "commented.yaml").write_text(COMMENTED, "utf-8")
    env.state.catalog.reload()
    # Saving unchanged changes nothing at all.
    assert _put(client, admin, env) == COMMENTED

    after = _put(client, admin, env, priority=7)
    assert _changed(COMMENTED, after) == ["-priority: 5", "+priority: 7"]

    before = after
    after = _put(client, admin, env, models=["green-quality", "green-seg", "mask-fraction"],
                 outputs={"sr": True, "seg": True, "overlay": True})
    assert _changed(before, after) == [
        "+  - green-seg",
        "-outputs: {sr: true, seg: true, overlay: false}",
        "+outputs: {sr: true, seg: true, overlay: true}",
    ]
    assert "  - green-quality   # the gate first" in after
    assert "  modality: OP          # a single value, not a list" in after
    assert after.startswith("# preset: presets/commented.yaml -- kept by the clinic's IT team")

    before = after
    routing = {"modality": ["OP"], "calling_ae": ["CAM1", "CAM7"]}
    after = _put(client, admin, env, routing=routing)
    assert _changed(before, after) == ["-  calling_ae: [CAM1]", "+  calling_ae: [CAM1, CAM7]"]
    loaded = yaml.safe_load(after)
    assert loaded["routing"] == {"modality": "OP", "calling_ae": ["CAM1", "CAM7"]}
    assert loaded["models"] == ["green-quality", "green-seg", "mask-fraction"]
    # The revision's diff is the same small difference.
    revision = client.get("/api/presets/commented", headers=admin).json()["revisions"][0]
    assert "+  calling_ae: [CAM1, CAM7]" in revision["diff"]
    assert "# the gate first" not in "".join(
        line for line in revision["diff"].splitlines() if line.startswith(("+", "-")))


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_presets_keep_their_text(path: Path) -> None:
    text = path.read_text("utf-8")
    preset = parse_preset(text, None, registry=None, destinations=None)
    assert edited_text(text, preset) == text
    changed = preset.model_copy(update={"priority": preset.priority + 1})
    added, removed = [], []
    for line in difflib.unified_diff(text.splitlines(), edited_text(text, changed).splitlines(),
                                     lineterm="", n=0):
        if line.startswith("+") and not line.startswith("+++"):
            added.append(line)
        elif line.startswith("-") and not line.startswith("---"):
            removed.append(line)
    assert added == [f"+priority: {preset.priority + 1}"]
    assert len(removed) == (1 if "priority:" in text else 0)

"""A preset saved from the console resolves to exactly the graph the console showed.

The console's toggles go to `POST /api/resolve` (with/without on top of the preset's models);
"Save as new" posts the answer's `combination`. Before, the console saved only the selected
models: a model that had come along as an alternative (green-seg-alt once green-seg is off)
was left out, and the saved preset resolved to the other alternative again.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.cli import main
from tests.web.conftest import Env

# mask-fraction reads green-seg or green-seg-alt (alternatives that conflict); mask-centre only
# green-seg; green-quality gates both segmenters.
FRACTIONS: dict[str, Any] = {
    "id": "fractions", "name": "Fractions", "audience": "tests",
    "description": "Segmentation and its mask fraction.",
    "models": ["green-quality", "green-seg", "mask-fraction"],
    "routing": {"modality": ["OP"]},
}
MODELS = ["green-quality", "green-seg", "green-seg-alt", "mask-centre", "mask-fraction"]
SHAPE = ("stages", "models", "edges", "inputs")
_ids = itertools.count()


def _shape(graph: dict[str, Any]) -> dict[str, Any]:
    return {key: graph[key] for key in SHAPE}


class Console:
    """The preset page's selection logic (preset.js `toggle`), through the same API."""

    def __init__(self, client: TestClient, headers: dict[str, str], base: list[str]) -> None:
        self.client, self.headers, self.base = client, headers, base
        self.with_: list[str] = []
        self.without: list[str] = []
        graph = self._resolve()
        assert graph is not None
        self.graph: dict[str, Any] = graph

    def _resolve(self) -> dict[str, Any] | None:
        res = self.client.post("/api/resolve", headers=self.headers, json={
            "models": self.base, "with": self.with_, "without": self.without,
            "modality": "OP"})
        return res.json() if res.status_code == 200 else None

    def toggle(self, model: str, on: bool) -> None:
        before = (list(self.with_), list(self.without))
        if on:
            self.without = [m for m in self.without if m != model]
            if model not in self.base and model not in self.with_:
                self.with_.append(model)
        elif model in self.with_:
            self.with_.remove(model)
        elif model not in self.without:
            self.without.append(model)
        graph = self._resolve()
        if graph is None:  # the console puts the switches back
            self.with_, self.without = before
        else:
            self.graph = graph

    def save_as_new(self) -> str:
        preset_id = f"saved-{next(_ids)}"
        body = {**FRACTIONS, "id": preset_id, "models": self.graph["combination"]}
        res = self.client.post("/api/presets", headers=self.headers, json=body)
        assert res.status_code == 201, res.json()
        return preset_id


def _setup(env: Env) -> None:
    if not (env.presets_dir / "fractions.yaml").exists():
        (env.presets_dir / "fractions.yaml").write_text(yaml.safe_dump(FRACTIONS), "utf-8")
        env.state.catalog.reload()


def test_switching_off_a_segmenter_saves_the_alternative_that_replaced_it(
    client: TestClient, admin: dict[str, str], env: Env, capsys: Any,
) -> None:
    _setup(env)
    console = Console(client, admin, FRACTIONS["models"])
    console.toggle("green-seg", False)
    shown = console.graph
    assert sorted(shown["models"]) == ["green-quality", "green-seg-alt", "mask-fraction"]
    assert "green-seg-alt" in shown["added"]
    preset_id = console.save_as_new()
    saved = env.preset_yaml(preset_id)
    assert saved["models"] == ["green-quality", "mask-fraction", "green-seg-alt"]
    got = client.get(f"/api/presets/{preset_id}", headers=admin).json()["graph"]
    assert _shape(got) == _shape(shown)
    # And the command line, which reads the file, agrees.
    assert main(["graph", "--preset", preset_id, "--json",
                 "--config", str(env.root / "dicomnode.yaml")]) == 0
    assert _shape(json.loads(capsys.readouterr().out)) == _shape(shown)


def test_a_pinned_older_version_stays_pinned(
    client: TestClient, admin: dict[str, str], env: Env
) -> None:
    _setup(env)
    console = Console(client, admin, ["green-quality", "green-seg@1.0.0", "mask-fraction"])
    assert console.graph["models"]["green-seg"] == "1.0.0"
    assert console.graph["combination"] == ["green-quality", "green-seg@1.0.0", "mask-fraction"]
    preset_id = console.save_as_new()
    got = client.get(f"/api/presets/{preset_id}", headers=admin).json()["graph"]
    assert got["models"]["green-seg"] == "1.0.0"


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(MODELS), st.booleans()), max_size=6))
def test_any_toggle_sequence_saves_the_graph_shown(
    client: TestClient, admin: dict[str, str], env: Env, toggles: list[tuple[str, bool]],
) -> None:
    _setup(env)
    console = Console(client, admin, FRACTIONS["models"])
    for model, on in toggles:
        console.toggle(model, on)
    shown = console.graph
    if not shown["models"]:
        return  # nothing to save (a preset needs a model)
    preset_id = console.save_as_new()
    got = client.get(f"/api/presets/{preset_id}", headers=admin).json()["graph"]
    assert _shape(got) == _shape(shown)
    assert client.delete(f"/api/presets/{preset_id}", headers=admin).status_code == 200

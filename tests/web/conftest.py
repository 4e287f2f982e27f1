"""Fixtures for the console and API: a tmp registry of fixture models, tmp presets, users."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.settings import Settings, load_settings
from dicomnode.web import auth
from dicomnode.web.app import create_app
from dicomnode.web.state import CatalogHolder, WebState
from tests.support.onnx_models import write_example_registry

ADMIN_PASSWORD = "admin-password-1"
VIEWER_PASSWORD = "viewer-password-1"

# green-quality gates green-seg / green-seg-alt (which conflict); mask-centre reads green-seg.
SCREENING = {
    "id": "screening", "name": "Green screening", "audience": "Primary care",
    "description": "Quality gate and mask fraction.",
    "models": ["green-quality", "mask-fraction"],
    "routing": {"modality": ["OP"], "calling_ae": ["CAM1"]}, "priority": 5,
}
CENTRES = {
    "id": "centres", "name": "Mask centres", "audience": "Ophthalmology",
    "description": "Quality gate and the centre of the green mask.",
    "models": ["green-quality", "mask-centre"],
    "routing": {"modality": ["OP"], "calling_ae": ["CAM2"]},
}


@dataclass
class Env:
    root: Path
    settings: Settings
    database: Database
    state: WebState
    admin_token: str
    viewer_token: str

    @property
    def presets_dir(self) -> Path:
        return self.settings.presets.path

    def preset_yaml(self, preset_id: str) -> dict[str, object]:
        data = yaml.safe_load((self.presets_dir / f"{preset_id}.yaml").read_text("utf-8"))
        assert isinstance(data, dict)
        return data


def make_env(root: Path, web: dict[str, object] | None = None) -> Env:
    write_example_registry(root / "model_registry")
    presets = root / "presets"
    presets.mkdir()
    for preset in (SCREENING, CENTRES):
        (presets / f"{preset['id']}.yaml").write_text(yaml.safe_dump(preset), "utf-8")
    config = {
        "storage": {"path": "storage", "min_free_mb": 0},
        "database": {"url": "sqlite:///node.db"},
        "registry": {"path": "model_registry"},
        "presets": {"path": "presets"},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}},
        "web": web or {"port": 0},
    }
    path = root / "dicomnode.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    settings = load_settings(path)
    database = open_database(settings.database.url)
    auth.add_user(database, "alice", "admin", ADMIN_PASSWORD)
    auth.add_user(database, "victor", "viewer", VIEWER_PASSWORD)
    state = WebState(settings, database, CatalogHolder(settings))
    return Env(root, settings, database, state,
               auth.issue_token(database, "alice"), auth.issue_token(database, "victor"))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = make_env(tmp_path)
    try:
        yield environment
    finally:
        environment.database.dispose()


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.state)) as test_client:
        yield test_client


@pytest.fixture
def admin(env: Env) -> dict[str, str]:
    return {"Authorization": f"Bearer {env.admin_token}"}


@pytest.fixture
def viewer(env: Env) -> dict[str, str]:
    return {"Authorization": f"Bearer {env.viewer_token}"}

"""The node serves the console/API on the configured address, and a preset saved through the
API reaches the running processing service without a restart."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from dicomnode.app import Node
from dicomnode.db import open_database
from dicomnode.settings import load_settings
from dicomnode.web import auth
from tests.support.peers import free_port, require_tool
from tests.web.conftest import SCREENING, make_env


def _node_config(tmp_path: Path, web: dict[str, object]) -> Path:
    env = make_env(tmp_path, web=web)
    env.database.dispose()
    config = yaml.safe_load((tmp_path / "dicomnode.yaml").read_text("utf-8"))
    config["node"] = {"host": "127.0.0.1", "port": free_port(), "shutdown_grace_seconds": 1}
    config["inference"] = {"workers": 0}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    return path


def test_node_serves_api_and_preset_edits_reach_processing(tmp_path: Path) -> None:
    port = free_port()
    settings = load_settings(_node_config(tmp_path, {"host": "127.0.0.1", "port": port}))
    database = open_database(settings.database.url)
    token = auth.issue_token(database, "alice")
    database.dispose()
    node = Node(settings)
    try:
        node.start()
        assert node.web is not None and node.web.address == ("127.0.0.1", port)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/api/health").status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        new = {**SCREENING, "id": "cam9", "routing": {"calling_ae": ["CAM9"]}}
        response = httpx.post(f"{base}/api/presets", json=new, headers=headers)
        assert response.status_code == 201, response.text
        assert node.processing is not None
        assert "cam9" in node.processing.presets.presets
        assert node.results is not None and "cam9" in node.results.presets.presets
    finally:
        node.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)


def test_web_disabled_and_port_taken(tmp_path: Path) -> None:
    settings = load_settings(_node_config(tmp_path / "a", {"enabled": False}))
    node = Node(settings)
    try:
        node.start()
        assert node.web is None
    finally:
        node.stop()
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        settings = load_settings(_node_config(tmp_path / "b", {"port": busy}))
        node = Node(settings)
        try:
            # The console cannot bind: reported, and the DICOM service still answers.
            host, port = node.start()
            assert node.web is None
            assert node.web_error is not None and "web console cannot listen" in node.web_error
            assert str(busy) in node.web_error
            health = node.health()
            assert health["web"]["ok"] is False and str(busy) in health["web"]["error"]
            echo = subprocess.run(
                [require_tool("echoscu", "dcmtk"), "-aec", settings.node.ae_title,
                 host, str(port)], capture_output=True, text=True, timeout=30)
            assert echo.returncode == 0, echo.stdout + echo.stderr
        finally:
            node.stop()

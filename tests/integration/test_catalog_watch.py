"""A running `dicomnode serve` picks up preset files changed on disk (another node, an editor)
without a restart: added, broken (left out, reported, the good ones kept), removed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.node import NodeProcess, write_config
from tests.support.onnx_models import write_example_registry
from tests.support.peers import free_port

pytestmark = pytest.mark.integration

SCREENING = {
    "id": "screening", "name": "Green screening", "audience": "Primary care",
    "description": "Quality gate and mask fraction.",
    "models": ["green-quality", "mask-fraction"],
    "routing": {"modality": ["OP"], "calling_ae": ["CAM1"]},
}


def _preset(preset_id: str, **changes: object) -> str:
    return yaml.safe_dump({**SCREENING, "id": preset_id, **changes})


def _cli(config: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60, input=stdin,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _wait_for(probe: Callable[[], Any], accept: Callable[[Any], bool], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    seen = probe()
    while not accept(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = probe()
    return seen


def _node_config(tmp_path: Path, web: dict[str, Any]) -> tuple[Path, Path]:
    write_example_registry(tmp_path / "model_registry")
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "screening.yaml").write_text(_preset("screening"), "utf-8")
    config = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'node.db'}",
        registry={"path": str(tmp_path / "model_registry")},
        presets={"path": str(presets), "watch_seconds": 0.3},
        inference={"workers": 0}, web=web,
    )
    return config, presets


def test_preset_files_changed_on_disk_reach_the_running_node(tmp_path: Path) -> None:
    port = free_port()
    config, presets = _node_config(tmp_path, {"enabled": True, "host": "127.0.0.1",
                                              "port": port})
    _cli(config, "users", "add", "alice", "--role", "admin", "--password-stdin",
         stdin="a-long-password-1\n")
    token = _cli(config, "users", "token", "alice").strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {token}"}

    def listing() -> tuple[set[str], set[str]]:
        body = httpx.get(f"http://127.0.0.1:{port}/api/presets", headers=headers,
                         timeout=10).json()
        return ({p["id"] for p in body["presets"]},
                {Path(p["file"]).name for p in body["problems"] if p["file"]})

    with NodeProcess(config) as node:
        assert listing() == ({"screening"}, set())

        # Written by "another node" or an editor: listed within a few seconds, no restart.
        (presets / "cam9.yaml").write_text(_preset("cam9"), "utf-8")
        seen = _wait_for(listing, lambda s: "cam9" in s[0], 15)
        assert seen == ({"screening", "cam9"}, set()), node.log()

        # A broken file is left out and reported; the good presets keep working.
        (presets / "broken.yaml").write_text("id: broken\nmodels: [green-quality\n", "utf-8")
        seen = _wait_for(listing, lambda s: "broken.yaml" in s[1], 15)
        assert seen == ({"screening", "cam9"}, {"broken.yaml"}), node.log()

        # Removed: gone from the node; fixing the broken file makes it load.
        (presets / "cam9.yaml").unlink()
        (presets / "broken.yaml").write_text(_preset("broken"), "utf-8")
        seen = _wait_for(listing, lambda s: "cam9" not in s[0] and "broken" in s[0], 15)
        assert seen == ({"screening", "broken"}, set()), node.log()

        assert node.terminate() == 0
    log = node.log()
    assert "catalog reloaded (files changed): preset added cam9" in log
    assert "preset refused" in log and "broken.yaml" in log
    assert "preset removed cam9" in log
    assert "Traceback" not in log


def test_watcher_runs_with_the_console_disabled(tmp_path: Path) -> None:
    config, presets = _node_config(tmp_path, {"enabled": False})
    with NodeProcess(config) as node:
        (presets / "cam9.yaml").write_text(_preset("cam9"), "utf-8")
        log = _wait_for(node.log, lambda text: "preset added cam9" in text, 15)
        assert "catalog reloaded (files changed): preset added cam9" in log, log
        assert node.terminate() == 0
    assert "dicomnode stopped" in node.log()


def test_a_model_copied_into_the_registry_reaches_processing_and_results(
    tmp_path: Path,
) -> None:
    from dicomnode.app import Node
    from dicomnode.settings import load_settings
    from tests.support.onnx_models import RegistryWriter, classifier_manifest

    config, presets = _node_config(tmp_path, {"enabled": False})
    node = Node(load_settings(config))
    try:
        node.start()
        assert node.processing is not None and node.results is not None
        assert node.watcher is not None and node.watcher.running
        # A model version and a preset naming it arrive together (e.g. one rsync run).
        RegistryWriter(tmp_path / "model_registry").add(classifier_manifest("extra-gate"))
        (presets / "extra.yaml").write_text(_preset("extra", models=["extra-gate"]), "utf-8")
        processing = node.processing
        seen = _wait_for(lambda: set(processing.presets.presets),
                         lambda ids: "extra" in ids, 15)
        assert seen == {"screening", "extra"}
        assert processing.registry.has("extra-gate")
        assert processing.executor.registry is processing.registry
        assert node.results.registry is processing.registry
        assert node.results.presets is processing.presets
    finally:
        node.stop()
    assert not node.watcher.running


def test_a_worker_node_follows_preset_files_too(tmp_path: Path) -> None:
    """`dicomnode worker` (processing only, no receiver or console) reloads like `serve`."""
    import signal

    config, presets = _node_config(tmp_path, {"enabled": False})
    log_path = tmp_path / "worker.log"
    with log_path.open("w", encoding="utf-8") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(config)],
            stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: log_path.read_text("utf-8"),
                      lambda text: "catalog watcher: checking" in text, 30)
            (presets / "cam7.yaml").write_text(_preset("cam7"), "utf-8")
            log = _wait_for(lambda: log_path.read_text("utf-8"),
                            lambda text: "preset added cam7" in text, 15)
            assert "catalog reloaded (files changed): preset added cam7" in log, log
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=60)
    assert code == 0, log_path.read_text("utf-8")

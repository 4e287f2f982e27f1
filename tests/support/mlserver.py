"""Seldon MLServer on loopback: a real Open Inference Protocol (KServe v2) server.

MLServer pins FastAPI < 0.116, so it lives in its own virtual environment and runs as a
separate process: `$DICOMNODE_MLSERVER` (the `mlserver` executable), else `.mlserver-venv/`
in the repository, else `mlserver` on PATH. A missing server skips locally, fails with CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from dicomnode.registry.registry import ModelEntry
from tests.support.peers import free_port, unavailable

ROOT = Path(__file__).resolve().parents[2]


def find_mlserver() -> str:
    for candidate in (os.environ.get("DICOMNODE_MLSERVER"),
                      str(ROOT / ".mlserver-venv" / "bin" / "mlserver"),
                      shutil.which("mlserver")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    unavailable("mlserver not found (python -m venv .mlserver-venv && "
                ".mlserver-venv/bin/pip install mlserver onnxruntime)")
    raise AssertionError("unreachable")


@contextmanager
def mlserver(entries: Sequence[ModelEntry], folder: Path, *, port: int | None = None,
             ready_timeout: float = 120.0) -> Iterator[str]:
    """Serve `entries` (each under its model id); yield the base URL; stop it (bounded)."""
    executable = find_mlserver()
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
        "metrics_port": free_port(), "parallel_workers": 0, "debug": False,
    }))
    for entry in entries:
        model_dir = folder / entry.id
        model_dir.mkdir()
        (model_dir / "model-settings.json").write_text(json.dumps({
            "name": entry.id,
            "implementation": "tests.support.mlserver_runtime.OnnxModel",
            "parameters": {"uri": str(entry.onnx_path), "version": entry.version},
        }))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (folder / "mlserver.log").open("wb")
    process = subprocess.Popen([executable, "start", str(folder)], cwd=folder, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlserver exited ({process.returncode}): "
                                   f"{(folder / 'mlserver.log').read_text()[-2000:]}")
            try:
                if all(httpx.get(f"{url}/v2/models/{e.id}/ready", timeout=2).status_code == 200
                       for e in entries):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlserver not ready after {ready_timeout} s: "
                                   f"{(folder / 'mlserver.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()

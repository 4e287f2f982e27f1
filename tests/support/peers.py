"""Real peers for tests. A missing peer skips on a developer machine and fails in CI."""

from __future__ import annotations

import os
import shutil
import socket
import sysconfig
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip with `reason` locally; in CI (CI=true) a missing peer is a failure, not a skip."""
    if in_ci():
        pytest.fail(f"required peer missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def system_tool(name: str) -> str | None:
    """Path of a system executable (a Debian package's), never the Python environment's own.

    pynetdicom installs console scripts named `echoscu`, `storescu` and `storescp`; with the
    virtual environment activated they come first on PATH and would stand in for DCMTK.
    """
    own = Path(sysconfig.get_path("scripts")).resolve()
    search = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
              if p and Path(p).resolve() != own]
    return shutil.which(name, path=os.pathsep.join(search))


def require_tool(name: str, package: str) -> str:
    """Path of a peer's executable, e.g. require_tool('storescu', 'dcmtk')."""
    path = system_tool(name)
    if path is None:
        unavailable(f"{name} not found (apt-get install {package})")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

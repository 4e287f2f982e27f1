"""Real peers for tests. A missing peer skips on a developer machine and fails in CI."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip with `reason` locally; in CI (CI=true) a missing peer is a failure, not a skip."""
    if in_ci():
        pytest.fail(f"required peer missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, package: str) -> str:
    """Path of an executable, e.g. require_tool('storescu', 'dcmtk')."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found (apt-get install {package})")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

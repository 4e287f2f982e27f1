"""Fixtures shared by the integration tests of the shipped models: the shipped registry and an
executor on it, made once per module (loading every ONNX session is the slow part)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.inference.executor import GraphExecutor
from dicomnode.inference.sessions import SessionPool
from dicomnode.registry import Registry, load_registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(ROOT / "model_registry")


@pytest.fixture(scope="module")
def executor(registry: Registry) -> GraphExecutor:
    return GraphExecutor(registry, SessionPool(["CPUExecutionProvider"]), model_threads=2)

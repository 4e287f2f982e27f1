"""Fixtures for the selection engine: a registry folder written with tiny ONNX models."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.registry import Registry, load_registry
from tests.support.onnx_models import RegistryWriter, write_example_registry


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    root = tmp_path / "model_registry"
    write_example_registry(root)
    return root


@pytest.fixture
def registry(registry_dir: Path) -> Registry:
    return load_registry(registry_dir)


@pytest.fixture
def writer(tmp_path: Path) -> RegistryWriter:
    return RegistryWriter(tmp_path / "model_registry")

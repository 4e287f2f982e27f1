"""Model manifests, registry loading and checks."""

from dicomnode.registry.loader import load_registry, read_manifest
from dicomnode.registry.manifest import Manifest
from dicomnode.registry.registry import (
    LeftOut,
    ModelEntry,
    Registry,
    build_registry,
    parse_model_ref,
)

__all__ = [
    "LeftOut",
    "Manifest",
    "ModelEntry",
    "Registry",
    "build_registry",
    "load_registry",
    "parse_model_ref",
    "read_manifest",
]

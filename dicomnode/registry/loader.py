"""Read `<root>/<id>/<version>/manifest.yaml` folders into a Registry; bad ones are left out."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from pydantic import ValidationError

from dicomnode.registry.manifest import Manifest
from dicomnode.registry.onnx_check import OnnxCheckError, check_against_manifest, read_signature
from dicomnode.registry.registry import LeftOut, ModelEntry, Registry, build_registry

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.yaml"


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


def read_manifest(path: Path) -> Manifest:
    """Parse and validate one manifest file; raise ValueError with a precise message."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict):
        raise ValueError("a manifest is a mapping of fields")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from exc


def check_entry(entry: ModelEntry) -> list[str]:
    """Problems with one model's own files (the ONNX graph against the manifest, the card)."""
    assert entry.onnx_path is not None and entry.directory is not None
    problems: list[str] = []
    try:
        signature = read_signature(entry.onnx_path)
    except OnnxCheckError as exc:
        problems.append(str(exc))
    else:
        problems.extend(check_against_manifest(entry.manifest, signature))
    card = entry.card_path
    if card is not None and not card.is_file():
        problems.append(f"model card {entry.manifest.provenance.card} is missing")
    return problems


def load_registry(root: Path) -> Registry:
    """Load every model under root. Never raises for a bad model: it is left out with a reason."""
    if not root.is_dir():
        logger.warning("model registry %s does not exist: no models", root)
        return Registry({}, (), root)
    candidates: list[ModelEntry] = []
    refused: list[LeftOut] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        version_dirs = sorted(
            p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not version_dirs:
            refused.append(LeftOut(model_dir.name, None, model_dir, "no version folders"))
        for version_dir in version_dirs:
            entry, problem = _load_one(model_dir.name, version_dir)
            if entry is None:
                assert problem is not None
                refused.append(problem)
            else:
                candidates.append(entry)
    for lo in refused:
        logger.warning("model %s left out: %s", lo.label, lo.reason)
    registry = build_registry(candidates, refused, root)
    logger.info(
        "model registry %s: %d model versions accepted, %d left out",
        root,
        len(registry),
        len(registry.left_out),
    )
    return registry


def _load_one(folder_id: str, version_dir: Path) -> tuple[ModelEntry | None, LeftOut | None]:
    path = version_dir / MANIFEST_NAME
    if not path.is_file():
        return None, LeftOut(folder_id, version_dir.name, path, f"{MANIFEST_NAME} is missing")
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        return None, LeftOut(folder_id, version_dir.name, path, str(exc))
    if (manifest.id, manifest.version) != (folder_id, version_dir.name):
        return None, LeftOut(
            folder_id,
            version_dir.name,
            path,
            f"manifest says {manifest.id}@{manifest.version} but the folder is "
            f"{folder_id}/{version_dir.name}; they must match",
        )
    entry = ModelEntry(manifest, version_dir)
    problems = check_entry(entry)
    if problems:
        return None, LeftOut(manifest.id, manifest.version, entry.onnx_path, "; ".join(problems))
    return entry, None

"""A model's measured efficacy as the console shows it: per dataset, each figure with its
confidence interval (`<name>_ci`) where the manifest has one, the date and the data hash, and
the operating points (thresholds) the figures were measured at."""

from __future__ import annotations

from typing import Any

from dicomnode.errors import RegistryLookupError
from dicomnode.registry.manifest import Manifest, MetricRecord
from dicomnode.registry.registry import Registry

CI_SUFFIX = "_ci"


def figures(record: MetricRecord) -> list[dict[str, Any]]:
    """[{name, value, ci}] in the manifest's order; an interval joins its base figure (or
    stands alone when the base figure is missing)."""
    rows: list[dict[str, Any]] = []
    for name, value in record.figures.items():
        if name.endswith(CI_SUFFIX) and name[: -len(CI_SUFFIX)] in record.figures:
            continue
        if isinstance(value, list):
            rows.append({"name": name[: -len(CI_SUFFIX)], "value": None, "ci": value})
            continue
        interval = record.figures.get(name + CI_SUFFIX)
        rows.append({"name": name, "value": value,
                     "ci": interval if isinstance(interval, list) else None})
    return rows


def operating_points(manifest: Manifest) -> list[dict[str, Any]]:
    """The thresholds the model's outputs decide at (masks; thresholded classifiers)."""
    points = []
    for output in manifest.outputs:
        threshold = getattr(output, "threshold", None)
        if threshold is not None:
            points.append({"output": output.name, "kind": output.kind,
                           "threshold": float(threshold)})
    return points


def efficacy(manifest: Manifest) -> dict[str, Any]:
    return {
        "measured": bool(manifest.metrics),
        "datasets": [
            {"dataset": r.dataset, "split": r.split, "date": r.date,
             "dataset_sha256": r.dataset_sha256, "notes": r.notes, "figures": figures(r)}
            for r in manifest.metrics],
        "operating_points": operating_points(manifest),
    }


def unmeasured(models: dict[str, str], registry: Registry) -> list[str]:
    """The models of a resolved graph ({id: version}) that have no measured figures."""
    missing = []
    for model_id, version in sorted(models.items()):
        try:
            manifest = registry.get(model_id, version).manifest
        except RegistryLookupError:
            continue
        if not manifest.metrics:
            missing.append(model_id)
    return missing

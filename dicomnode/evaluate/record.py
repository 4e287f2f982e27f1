"""`--record`: write an evaluation into the model's manifest `metrics` and the database.

The manifest is rewritten atomically (a temporary file in the same folder, fsynced, then
renamed over it) and only after the new text has been validated as a manifest: a crash or a bad
value leaves the old manifest in place. Its leading comment lines are kept; other comments are
not (PyYAML does not keep them).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from dicomnode.db.engine import Database
from dicomnode.db.models import ModelEvaluation
from dicomnode.durable import write_text_atomic
from dicomnode.evaluate.dataset import Dataset
from dicomnode.evaluate.run import Evaluation
from dicomnode.registry.manifest import Manifest
from dicomnode.registry.registry import ModelEntry

logger = logging.getLogger(__name__)


def numeric_figures(evaluation: Evaluation) -> dict[str, float | list[float]]:
    """The figures a manifest can hold: finite numbers, and `<name>_ci` intervals [low, high]."""
    out: dict[str, float | list[float]] = {}
    for key, value in evaluation.flat_figures().items():
        if (key.endswith("_ci") and isinstance(value, list | tuple) and len(value) == 2
                and all(math.isfinite(float(v)) for v in value)):
            out[key] = [round(float(v), 6) for v in value]
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[key] = round(float(value), 6)
    return out


def metric_record(evaluation: Evaluation, dataset: Dataset, sha256: str,
                  when: datetime | None = None) -> dict[str, Any]:
    date = (when or datetime.now(UTC)).date().isoformat()
    notes = f"dicomnode evaluate; {evaluation.images} images"
    sources = sorted(f"{m}@{v}" for m, v in evaluation.graph.items() if m != evaluation.model)
    if sources:
        notes += f"; with {', '.join(sources)}"
    if evaluation.skipped:
        notes += f", {len(evaluation.skipped)} skipped"
    return {"dataset": dataset.name, "split": "evaluation", "date": date,
            "dataset_sha256": sha256, "figures": numeric_figures(evaluation), "notes": notes}


def write_manifest_record(entry: ModelEntry, record: dict[str, Any]) -> Path:
    if entry.directory is None:
        raise ValueError(f"{entry.manifest.key} has no folder to record into")
    path = entry.directory / "manifest.yaml"
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    metrics = list(data.get("metrics") or [])
    metrics.append(record)
    data["metrics"] = metrics
    Manifest.model_validate(data)  # never write what the registry would refuse
    lead: list[str] = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lead.append(line)
    body = "".join(lead) + yaml.safe_dump(data, sort_keys=False, width=100, allow_unicode=True)
    write_text_atomic(path, body)
    logger.info("recorded %s on %s in %s", entry.manifest.key, record["dataset"], path)
    return path


def write_database_record(database: Database, evaluation: Evaluation, sha256: str) -> int:
    with database.transaction() as session:
        row = ModelEvaluation(
            model_id=evaluation.model, version=evaluation.version,
            dataset=evaluation.dataset, dataset_sha256=sha256, task=evaluation.kind,
            images=evaluation.images, figures=json.dumps(numeric_figures(evaluation)),
        )
        session.add(row)
        session.flush()
        return int(row.id)

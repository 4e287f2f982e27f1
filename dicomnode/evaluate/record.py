"""`--record`: write an evaluation into the model's manifest `metrics` and the database.

The manifest is rewritten atomically (a temporary file in the same folder, fsynced, then
renamed over it) and only after the new text has been validated as a manifest: a crash or a bad
value leaves the old manifest in place. The file keeps its shape: the record is appended to
`metrics` through a ruamel.yaml round trip (dicomnode.yaml_edit), so comments, key order and
style stay, and the only lines that change are the new record's.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from dicomnode import yaml_edit
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
                  when: datetime | None = None, *, name: str | None = None,
                  split: str | None = None) -> dict[str, Any]:
    """The manifest's metrics entry; `name` and `split` say which dataset and which part of it
    (default: the CSV's name, split "evaluation")."""
    date = (when or datetime.now(UTC)).date().isoformat()
    notes = f"dicomnode evaluate; {evaluation.images} images"
    sources = sorted(f"{m}@{v}" for m, v in evaluation.graph.items() if m != evaluation.model)
    if sources:
        notes += f"; with {', '.join(sources)}"
    if evaluation.skipped:
        notes += f", {len(evaluation.skipped)} skipped"
    return {"dataset": name or dataset.name, "split": split or "evaluation", "date": date,
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
    body = _appended(text, record)
    if yaml.safe_load(body) != data:  # the in-place edit must mean exactly the new data
        raise ValueError(f"{path}: appending the record in place would change other fields")
    write_text_atomic(path, body)
    logger.info("recorded %s on %s in %s", entry.manifest.key, record["dataset"], path)
    return path


def _appended(text: str, record: dict[str, Any]) -> str:
    """The manifest's text with `record` appended to `metrics` (created if missing).

    The record's lines are spliced into the text (after the last line of a block `metrics`
    list, or as a new `metrics:` at the end), so nothing else is re-emitted: a round-trip dump
    would re-wrap a person's multi-line flow mappings. Other shapes (`metrics: []`) go through
    the round trip.
    """
    round_trip, document = yaml_edit.load(text)
    if not isinstance(document, CommentedMap):
        raise ValueError("the manifest is not a YAML mapping")
    entry = CommentedMap(record)
    entry["figures"] = CommentedMap(record.get("figures", {}))
    entry["figures"].fa.set_flow_style()
    # A top-level list is dumped with the dash offset the file uses under its keys.
    item = yaml_edit.dump(round_trip, CommentedSeq([entry]))
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    metrics = document.get("metrics")
    if "metrics" not in document:
        return "".join(lines) + "metrics:\n" + item
    if isinstance(metrics, CommentedSeq) and len(metrics) and not metrics.fa.flow_style():
        keys = list(document.keys())
        after = keys[keys.index("metrics") + 1:]
        end = document.lc.key(after[0])[0] if after else len(lines)
        while end > 0 and (not lines[end - 1].strip()
                           or lines[end - 1].lstrip().startswith("#")) and after:
            end -= 1  # blank lines and comments above the next key stay with it
        return "".join(lines[:end]) + item + "".join(lines[end:])
    if isinstance(metrics, CommentedSeq):
        metrics.append(entry)
    else:  # `metrics:` with nothing (null)
        document["metrics"] = CommentedSeq([entry])
    return yaml_edit.dump(round_trip, document)


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

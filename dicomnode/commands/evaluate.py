"""`dicomnode evaluate MODEL[@VERSION] --dataset FILE.csv [--json] [--record [--name NAME]
[--split SPLIT]]`."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    print_json,
    settings_from,
)
from dicomnode.db import opened_database
from dicomnode.evaluate.dataset import read_dataset
from dicomnode.evaluate.record import (
    metric_record,
    write_database_record,
    write_manifest_record,
)
from dicomnode.evaluate.run import evaluate
from dicomnode.registry.loader import load_registry

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "evaluate", help="measure a model on a labelled dataset (CSV of images and truth)"
    )
    parser.add_argument("model", metavar="ID[@VERSION]")
    parser.add_argument("--dataset", type=Path, required=True, metavar="FILE.csv",
                        help="image,truth[,fov] | image,label | image,value; paths relative "
                             "to the CSV")
    parser.add_argument("--output", default=None,
                        help="the model output to measure (default: the first that fits)")
    parser.add_argument("--with", dest="with_models", action="append", default=[],
                        metavar="ID[@VERSION]",
                        help="also put this model in the graph (repeatable): an input with "
                             "alternatives then takes from it, e.g. vessel-metrics --with "
                             "vessel-seg-classic")
    parser.add_argument("--mask-threshold", type=float, default=None, metavar="T",
                        help="truth/FOV mask pixels with a value >= T are inside (default: >= "
                             "half the mask's largest value)")
    parser.add_argument("--record", action="store_true",
                        help="write the figures into the manifest's metrics and the database")
    parser.add_argument("--name", default=None, metavar="NAME",
                        help="with --record: the dataset's name in the record (default: the "
                             "CSV's file name), e.g. 'CHASE_DB1 11L-14R'")
    parser.add_argument("--split", default=None, metavar="SPLIT",
                        help="with --record: which part of the dataset (default: evaluation), "
                             "e.g. test")
    add_config_option(parser)
    add_json_option(parser)
    parser.set_defaults(func=run_evaluate)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_evaluate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    registry = load_registry(settings.registry.path)
    model_id, _, version = str(args.model).partition("@")
    entry = registry.get(model_id, version or None)  # RegistryLookupError names the problem
    dataset = read_dataset(args.dataset)
    result = evaluate(dataset, registry, entry, output=args.output,
                      with_models=args.with_models, mask_threshold=args.mask_threshold)
    payload = result.to_dict()
    if args.record:
        sha = dataset.sha256()
        record = metric_record(result, dataset, sha, name=args.name, split=args.split)
        payload["recorded"] = {"manifest": str(write_manifest_record(entry, record))}
        with opened_database(settings.database.url) as database:
            payload["recorded"]["database_id"] = write_database_record(database, result, sha)
        payload["dataset_sha256"] = sha
    if args.json:
        print_json(_json_safe(payload))
        return 0
    print(f"{result.model}@{result.version} on {result.dataset} ({result.kind}, output "
          f"{result.output}): {result.images} images, {len(result.skipped)} skipped")
    print(f"  graph: {', '.join(f'{m}@{v}' for m, v in sorted(result.graph.items()))}")
    for key, value in result.figures.items():
        if isinstance(value, list) and key.endswith("_ci"):
            shown = "[" + ", ".join(f"{v:.4f}" for v in value) + "] (95 %, bootstrap)"
        elif isinstance(value, dict) and key == "auc_per_class":
            shown = ", ".join(f"{k} {v:.4f}" for k, v in value.items())
        else:
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<18} {shown}")
    for image, reason in result.skipped.items():
        print(f"  skipped {image}: {reason}")
    if args.record:
        print(f"recorded in {payload['recorded']['manifest']} and the database")
    return 0

"""`dicomnode export-triton DIR`: a Triton model repository of the registry's models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dicomnode.commands.common import add_config_option, add_json_option, print_json, settings_from
from dicomnode.registry.loader import load_registry
from dicomnode.registry.triton import export_triton


def register(subparsers: Any) -> None:
    export = subparsers.add_parser(
        "export-triton",
        help="write a Triton model repository (config.pbtxt + model.onnx) of the models")
    export.add_argument("folder", type=Path, help="the repository folder (created)")
    export.add_argument("--model", action="append", default=None, metavar="ID",
                        help="only this model (repeatable); default: every latest version")
    add_config_option(export)
    add_json_option(export)
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    registry = load_registry(settings.registry.path)
    entries = ([registry.get(m) for m in args.model] if args.model
               else registry.latest_entries())
    done = export_triton(entries, args.folder, max_batch=settings.inference.max_batch)
    if args.json:
        print_json({"folder": str(args.folder), "models": [
            {"model": d.model_id, "config": str(d.config), "onnx": str(d.version_dir)}
            for d in done]})
    else:
        for d in done:
            print(f"{d.model_id}: {d.config}")
        print(f"{len(done)} model(s) written to {args.folder}")
    return 0

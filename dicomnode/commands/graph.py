"""`dicomnode graph --preset ID [--with M]... [--without M]... [--modality MOD]`.

Shows the structure that will run: stages, what came along and why, what was switched off,
and with `--choices`, for every model whether it can be switched on and why not.
"""

from __future__ import annotations

import argparse
from typing import Any

from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    print_json,
    print_table,
    settings_from,
)
from dicomnode.errors import ResolutionError
from dicomnode.graph.resolver import resolve
from dicomnode.graph.selectable import selectable
from dicomnode.graph.selection import Selection
from dicomnode.routing.catalog import load_catalog


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "graph",
        help="resolve a preset (plus/minus models) into the graph that will run",
        description="Resolve a selection into stages; say what was added and why.",
    )
    parser.add_argument("--preset", metavar="ID", help="start from this preset's models")
    parser.add_argument("--with", dest="with_models", action="append", default=[],
                        metavar="MODEL[@VERSION]", help="switch a model on (repeatable)")
    parser.add_argument("--without", action="append", default=[], metavar="MODEL",
                        help="switch a model off, and what needs it (repeatable)")
    parser.add_argument("--modality", metavar="MOD", help="check every model accepts it")
    parser.add_argument("--choices", action="store_true",
                        help="also list every model: can it be switched on, and why not")
    add_config_option(parser)
    add_json_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    catalog = load_catalog(settings_from(args))
    models: list[str] = []
    if args.preset:
        models = list(catalog.presets.get(args.preset).models)
    elif not args.with_models:
        raise ResolutionError(
            "nothing selected: give --preset ID and/or --with MODEL", kind="selection"
        )
    selection = Selection.of(
        models,
        with_models=args.with_models,
        without=args.without,
        modality=args.modality,
        preset=args.preset,
    )
    graph = resolve(selection, catalog.registry)
    choices = selectable(selection, catalog.registry) if args.choices else None
    if args.json:
        data: dict[str, Any] = graph.to_dict()
        if choices is not None:
            data["choices"] = {k: v.to_dict() for k, v in choices.items()}
        print_json(data)
        return 0
    title = f"preset {args.preset}" if args.preset else "custom selection"
    if args.modality:
        title += f", modality {graph.modality}"
    print(f"Graph for {title}: {len(graph.models)} models in {len(graph.stages)} stages")
    for index, stage in enumerate(graph.stages, start=1):
        print(f"  stage {index}: " + ", ".join(f"{m}@{graph.models[m]}" for m in stage))
    if graph.added:
        print("Added:")
        for model_id, reason in graph.added.items():
            print(f"  {model_id}: {reason}")
    if graph.removed:
        print("Not running:")
        for model_id, reason in graph.removed.items():
            print(f"  {model_id}: {reason}")
    if graph.inputs:
        print("Data:")
        for consumer, inputs in graph.inputs.items():
            for name, source in inputs.items():
                print(f"  {consumer}.{name} <- {source}")
    if choices is not None:
        print("Choices:")
        print_table(
            ["MODEL", "STATE", "REASON"],
            [[k, v.state, v.reason] for k, v in choices.items()],
        )
    return 0

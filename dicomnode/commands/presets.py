"""`dicomnode presets list | show ID | validate [FILE...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from dicomnode.commands.common import (
    add_config_option,
    add_json_option,
    print_json,
    print_table,
    problems_printed_here,
    settings_from,
)
from dicomnode.errors import ResolutionError
from dicomnode.graph.resolver import resolve
from dicomnode.graph.selection import Selection
from dicomnode.registry.loader import load_registry
from dicomnode.routing.catalog import load_catalog
from dicomnode.routing.loader import PresetProblem, load_preset_paths

EXIT_PROBLEMS = 2


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "presets", help="list, show and validate presets"
    )
    sub = parser.add_subparsers(dest="presets_command", required=True, metavar="ACTION")
    lst = sub.add_parser("list", help="the presets that loaded (refused ones on stderr)")
    add_config_option(lst)
    add_json_option(lst)
    lst.set_defaults(func=run_list)
    show = sub.add_parser("show", help="one preset and the graph it resolves to")
    show.add_argument("preset", metavar="ID")
    add_config_option(show)
    add_json_option(show)
    show.set_defaults(func=run_show)
    validate = sub.add_parser(
        "validate", help="check preset files (default: the preset folder); exit 2 on problems"
    )
    validate.add_argument("files", nargs="*", type=Path, metavar="FILE")
    add_config_option(validate)
    add_json_option(validate)
    validate.set_defaults(func=run_validate)


def _report(problems: list[PresetProblem]) -> None:
    for problem in problems:
        print(f"dicomnode: preset refused: {problem}", file=sys.stderr)


def run_list(args: argparse.Namespace) -> int:
    catalog = load_catalog(settings_from(args))
    presets = catalog.presets
    if args.json:
        print_json(
            {
                "presets": [
                    {**p.model_dump(mode="json"), "file": str(presets.files[p.id])}
                    for p in presets.ordered()
                ],
                "problems": [p.to_dict() for p in presets.problems],
            }
        )
        return 0
    _report(presets.problems)
    rows = [
        [p.id, p.name, p.audience, p.priority, "yes" if p.enabled else "no", ", ".join(p.models)]
        for p in presets.ordered()
    ]
    if not rows:
        print("no presets loaded")
        return 0
    print_table(["ID", "NAME", "AUDIENCE", "PRIORITY", "ENABLED", "MODELS"], rows)
    return 0


def run_show(args: argparse.Namespace) -> int:
    catalog = load_catalog(settings_from(args))
    preset = catalog.presets.get(args.preset)
    data = preset.model_dump(mode="json")
    try:
        graph = resolve(Selection.of(preset.models, preset=preset.id), catalog.registry)
        resolved: dict[str, Any] | str = graph.to_dict()
    except ResolutionError as exc:  # it resolved at load; the registry may differ now
        resolved = f"does not resolve: {exc}"
    if args.json:
        print_json({"preset": data, "file": str(catalog.presets.files[preset.id]),
                    "graph": resolved})
        return 0
    print(f"# {preset.id}  ({catalog.presets.files[preset.id]})")
    print(yaml.safe_dump(data, sort_keys=False).rstrip())
    if isinstance(resolved, dict):
        print("# stages: " + " | ".join(", ".join(s) for s in resolved["stages"]))
    else:
        print(f"# {resolved}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    destinations = set(settings.destinations)
    with problems_printed_here():  # each problem once: printed below, not also logged
        if args.files:
            registry = load_registry(settings.registry.path)
            result = load_preset_paths(args.files, registry=registry,
                                       destinations=destinations)
        else:
            result = load_catalog(settings).presets  # also checks the modality defaults
    if args.json:
        print_json(
            {
                "valid": {pid: str(path) for pid, path in sorted(result.files.items())},
                "problems": [p.to_dict() for p in result.problems],
            }
        )
    else:
        for pid, path in sorted(result.files.items()):
            print(f"ok  {path} ({pid})")
        _report(result.problems)
    return EXIT_PROBLEMS if result.problems else 0

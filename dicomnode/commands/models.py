"""`dicomnode models list | show ID[@VERSION] | check`: the model registry."""

from __future__ import annotations

import argparse
import sys
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
from dicomnode.registry.registry import LeftOut, ModelEntry, Registry

EXIT_PROBLEMS = 2


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "models", help="list, show and check the models in the registry"
    )
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    for name, func, help_text in (
        ("list", run_list, "every model version, and those left out with the reason"),
        ("check", run_check, "check every model; exit 2 if any is left out"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_config_option(p)
        add_json_option(p)
        p.set_defaults(func=func)
    show = sub.add_parser("show", help="one model's manifest (latest version unless @VERSION)")
    show.add_argument("model", metavar="ID[@VERSION]")
    add_config_option(show)
    add_json_option(show)
    show.set_defaults(func=run_show)


def _registry(args: argparse.Namespace) -> Registry:
    settings = settings_from(args)
    return load_registry(settings.registry.path)


def _summary(entry: ModelEntry) -> dict[str, Any]:
    m = entry.manifest
    return {
        "id": m.id,
        "version": m.version,
        "name": m.name,
        "task": m.task,
        "modalities": m.modalities,
        "requires": m.requires,
        "conflicts": m.conflicts,
        "inputs_from": sorted({str(r) for i in m.upstream_inputs for r in i.sources}),
        "directory": None if entry.directory is None else str(entry.directory),
    }


def _left_out(lo: LeftOut) -> dict[str, Any]:
    return {
        "id": lo.id,
        "version": lo.version,
        "file": None if lo.file is None else str(lo.file),
        "reason": lo.reason,
    }


def run_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.json:
        print_json(
            {
                "models": [_summary(e) for e in registry.entries()],
                "left_out": [_left_out(lo) for lo in registry.left_out],
            }
        )
        return 0
    rows = []
    for entry in registry.entries():
        m = entry.manifest
        latest = " (latest)" if registry.get(m.id).version == m.version else ""
        rows.append(
            [m.id, m.version + latest, m.task, ",".join(m.modalities),
             ",".join(m.requires) or "-", ",".join(m.conflicts) or "-", "ok"]
        )
    for lo in registry.left_out:
        rows.append([lo.id, lo.version or "?", "-", "-", "-", "-", f"LEFT OUT: {lo.reason}"])
    if not rows:
        print(f"no models in {registry.root}")
        return 0
    print_table(["ID", "VERSION", "TASK", "MODALITIES", "REQUIRES", "CONFLICTS", "STATUS"], rows)
    return 0


def run_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entry = registry.lookup(args.model)  # RegistryLookupError -> stderr, exit 2
    manifest = entry.manifest.model_dump(mode="json", by_alias=True, exclude_none=True)
    card = entry.card_path
    versions = registry.versions(entry.id)
    info: dict[str, Any] = {
        "manifest": manifest,
        "directory": None if entry.directory is None else str(entry.directory),
        "card": None if card is None else str(card),
        "versions": versions,
        "latest": registry.get(entry.id).version,
    }
    if args.json:
        print_json(info)
        return 0
    print(f"# {entry.key}  ({entry.directory})")
    print(f"# versions: {', '.join(versions)}; latest: {info['latest']}")
    if card is not None:
        print(f"# card: {card}")
    print(yaml.safe_dump(manifest, sort_keys=False).rstrip())
    return 0


def _unresolvable(registry: Registry) -> dict[str, str]:
    """Models that load but cannot form a graph even alone (a cycle, a pinned-output gap)."""
    problems = {}
    for entry in registry.entries():
        try:
            resolve(Selection.of([entry.key]), registry)
        except ResolutionError as exc:
            problems[entry.key] = str(exc)
    return problems


def run_check(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    with problems_printed_here():  # each problem once: printed below, not also logged
        registry = load_registry(settings.registry.path)
        unresolvable = _unresolvable(registry)
    if args.json:
        print_json(
            {
                "ok": [e.key for e in registry.entries() if e.key not in unresolvable],
                "left_out": [_left_out(lo) for lo in registry.left_out],
                "unresolvable": unresolvable,
            }
        )
    else:
        for entry in registry.entries():
            if entry.key not in unresolvable:
                print(f"ok  {entry.key}")
        for lo in registry.left_out:
            print(f"dicomnode: model left out: {lo}", file=sys.stderr)
        for key, reason in unresolvable.items():
            print(f"dicomnode: model {key} does not resolve alone: {reason}", file=sys.stderr)
        print(
            f"{len(registry) - len(unresolvable)} model versions ok, "
            f"{len(registry.left_out)} left out, {len(unresolvable)} do not resolve"
        )
    return EXIT_PROBLEMS if registry.left_out or unresolvable else 0

"""`dicomnode route FILE.dcm [FILE...] [--calling-ae AE] [--called-ae AE]`: which preset?"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.commands.common import add_config_option, add_json_option, print_json, settings_from
from dicomnode.errors import RoutingError
from dicomnode.routing.catalog import load_catalog
from dicomnode.routing.facts import StudyFacts
from dicomnode.routing.router import route


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "route",
        help="which preset a study (its files) would be routed to, and why",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.dcm",
                        help="the instances of one study (a folder: every file under it)")
    parser.add_argument("--calling-ae", metavar="AE", help="the sender's AE title")
    parser.add_argument("--called-ae", metavar="AE", help="the AE title the sender called")
    add_config_option(parser)
    add_json_option(parser)
    parser.set_defaults(func=run)


def _read(path: Path) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise RoutingError(f"{path}: cannot read as DICOM: {exc}") from exc


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    if not files:
        raise RoutingError(f"no files under {', '.join(str(p) for p in paths)}")
    return files


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    catalog = load_catalog(settings)
    facts = StudyFacts.from_datasets(
        [_read(p) for p in _expand(args.files)],
        calling_ae=args.calling_ae,
        called_ae=args.called_ae,
    )
    decision = route(facts, catalog.presets.ordered(), settings.modality_defaults)
    if args.json:
        print_json(decision.to_dict())
        return 0
    print(f"preset: {decision.preset or '(none)'}")
    print(f"reason: {decision.reason}")
    for explanation in decision.explanations:
        state = "enabled" if explanation.enabled else "disabled"
        print(f"- {explanation.preset} (priority {explanation.priority}, {state}): "
              f"{explanation.note}")
        for condition in explanation.conditions:
            print(f"    {condition.text}")
    return 0

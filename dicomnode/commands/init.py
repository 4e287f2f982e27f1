"""`dicomnode init DIR`: a working node folder from the shipped configuration and models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dicomnode.bundled import CONFIG_FILE, init_folder


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "init",
        help="write the default configuration, the shipped presets and models into DIR",
        description=(
            "Write DIR/config/dicomnode.yaml, DIR/presets/ and DIR/model_registry/ (copies of "
            "what ships with the package). The configuration keeps the database and received "
            "files under DIR/var/. Then: cd DIR && dicomnode serve."
        ),
    )
    parser.add_argument("folder", type=Path, metavar="DIR", help="folder to write (created)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target: Path = args.folder
    for path in init_folder(target):
        print(f"wrote {path}{'' if path.is_file() else '/'}")
    config = target / CONFIG_FILE
    print(f"next: cd {target} && dicomnode serve   (or: dicomnode serve --config {config})")
    return 0

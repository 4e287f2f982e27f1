"""Command line: parse arguments, hand over to a command module. Kept thin on purpose."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from dicomnode import __version__
from dicomnode.errors import DicomNodeError

logger = logging.getLogger(__name__)

# Each module has `register(subparsers)`, adding its parsers with `func(args) -> int`.
COMMAND_MODULES: tuple[str, ...] = (
    "dicomnode.commands.node",
)

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode", description="DICOM AI gateway for retinal (fundus) imaging"
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except DicomNodeError as exc:
        print(f"dicomnode: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

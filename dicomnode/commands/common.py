"""Options and output shared by the command modules."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicomnode.redact import RedactingFormatter
from dicomnode.settings import Settings, load_settings


# Options may be given at a command group and again at its subcommand; SUPPRESS keeps a
# subcommand's parser from overwriting a value given earlier with its own default.
# `cli.build_parser` sets the real defaults once, at the top.
def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="settings file (default: config/dicomnode.yaml, the embedded default)",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print JSON instead of a table",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    configure_logging(settings.logging.level)
    return settings


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Tracebacks quote the exception's message, which may carry data set values.
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
    # pynetdicom logs every PDU at INFO; keep ordinary logs readable and free of patient data.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, getattr(logging, level)))


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line.rstrip())


def cli_actor() -> str:
    """Who an operator action from the command line is audited as: `cli:<login name>`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"cli:{user}"


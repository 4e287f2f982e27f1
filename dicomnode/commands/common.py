"""Options and output shared by the command modules."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicomnode.logs import configure_logging
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
    add_verbose_option(parser)


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="log more: one-shot commands log warnings only, -v adds INFO, -vv DEBUG",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print JSON instead of a table",
    )


def settings_from(args: argparse.Namespace, *, service: bool = False) -> Settings:
    """Load the settings and set up logging: `service` for the long-running commands."""
    settings = load_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.format, service=service,
                      verbose=getattr(args, "verbose", 0) or 0)
    return settings


# The loggers that report each left-out model and refused preset while the catalog loads.
CATALOG_LOGGERS = ("dicomnode.registry", "dicomnode.routing")


@contextmanager
def problems_printed_here() -> Iterator[None]:
    """For commands whose output lists every catalog problem (`models check`, `presets
    validate`): the loaders' own warning lines would repeat each one, so hold them back."""
    loggers = [logging.getLogger(name) for name in CATALOG_LOGGERS]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(logging.ERROR, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, level in zip(loggers, before, strict=True):
            lg.setLevel(level)


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


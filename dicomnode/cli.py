"""Command line: parse arguments, hand over to a command module. Kept thin on purpose."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

from dicomnode import __version__
from dicomnode.commands.common import add_verbose_option
from dicomnode.errors import DicomNodeError

logger = logging.getLogger(__name__)

# Each module has `register(subparsers)`, adding its parsers with `func(args) -> int`.
COMMAND_MODULES: tuple[str, ...] = (
    "dicomnode.commands.node",
    "dicomnode.commands.init",
    "dicomnode.commands.demo",
    "dicomnode.commands.models",
    "dicomnode.commands.presets",
    "dicomnode.commands.graph",
    "dicomnode.commands.route",
    "dicomnode.commands.jobs",
    "dicomnode.commands.deliveries",
    "dicomnode.commands.results",
    "dicomnode.commands.users",
    "dicomnode.commands.evaluate",
    "dicomnode.commands.retention",
    "dicomnode.commands.triton",
)

EXIT_ERROR = 2
# Commands that run until SIGINT/SIGTERM and wait for them with sigwait (app.serve, worker).
LONG_RUNNING = frozenset({"serve", "worker"})
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode", description="DICOM AI gateway for retinal (fundus) imaging"
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.set_defaults(config=None, json=False, verbose=0)
    add_verbose_option(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _command_word(words: Sequence[str]) -> str | None:
    return next((w for w in words if not w.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    if _command_word(sys.argv[1:] if argv is None else argv) in LONG_RUNNING:
        # Loading the command modules starts native threads (numpy's BLAS pool); a thread that
        # does not block the stop signals takes SIGTERM's default action and kills the node
        # mid-write. So block them before anything starts a thread; sigwait then sees them.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
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
    except BrokenPipeError:
        # Output piped into e.g. `head`, which closed early: not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

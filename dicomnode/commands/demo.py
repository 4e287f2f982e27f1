"""`dicomnode demo-study`: write a synthetic two-eye fundus study to send to a node."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from dicomnode.synthetic import demo_study

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo-study",
        help="write a synthetic two-eye fundus study (Ophthalmic Photography, R and L)",
        description=(
            "Write two Ophthalmic Photography 8 Bit files (right and left eye, one series "
            "each) of one synthetic study, ready for storescu."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--size", type=_positive_size, default=1024, metavar="N",
                        help="image side in pixels (default 1024)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed; the same seed gives the same pictures (default 0)")
    parser.add_argument("--patient-id", default="DEMO0001", metavar="ID",
                        help="Patient ID (default DEMO0001)")
    parser.set_defaults(func=run)


def _positive_size(text: str) -> int:
    value = int(text)
    if value < 64:
        raise argparse.ArgumentTypeError(f"size must be at least 64, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    paths = demo_study(args.out, size=args.size, seed=args.seed, patient_id=args.patient_id)
    for path in paths:
        print(path)
    return 0

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
    parser.add_argument("--pixel-spacing", type=_spacing, default=None, metavar="MM",
                        help="write Pixel Spacing (mm per pixel, e.g. 0.012) so measurements "
                             "are also reported in mm (default: absent, as on most cameras)")
    parser.set_defaults(func=run)


def _positive_size(text: str) -> int:
    value = int(text)
    if value < 64:
        raise argparse.ArgumentTypeError(f"size must be at least 64, got {value}")
    return value


def _spacing(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"pixel spacing is mm per pixel in (0, 1), got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    spacing = None if args.pixel_spacing is None else (args.pixel_spacing, args.pixel_spacing)
    paths = demo_study(args.out, size=args.size, seed=args.seed, patient_id=args.patient_id,
                       pixel_spacing=spacing)
    for path in paths:
        print(path)
    return 0

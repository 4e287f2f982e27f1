#!/usr/bin/env python3
"""Write `dicomnode evaluate` segmentation CSVs (`image,truth`) for the IDRiD segmentation set.

One CSV per split and mask type into --out (a folder outside the repository; it must not be
committed):  idrid-seg-<split>-<CODE>.csv  for CODE in OD, HE, EX, SE, MA.  Paths in the
CSVs are absolute. IDRiD ships no mask where an image has none of a lesion (e.g. soft
exudates on 13 of 27 test images): those rows have the truth `none` (dicomnode evaluate counts
every pixel of the image as negative), so every image counts.

The IDRiD masks here are 0/255 PNGs; `dicomnode evaluate` reads any non-zero pixel as inside.

Usage:
  .venv/bin/python scripts/make_idrid_segmentation_csv.py --out /tmp/idrid-csv
  .venv/bin/dicomnode evaluate lesion-seg --output hard_exudates \
      --dataset /tmp/idrid-csv/idrid-seg-test-EX.csv --json
  .venv/bin/dicomnode evaluate optic-disc --output disc_probability \
      --dataset /tmp/idrid-csv/idrid-seg-test-OD.csv --json
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomnode.evaluate.dataset import NO_TRUTH  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "IDRiD"
CODES = ("OD", "HE", "EX", "SE", "MA")


def write_csvs(data: Path, out: Path, splits: Sequence[str] = ("train", "test")) -> list[Path]:
    """The CSVs written, one per (split, code)."""
    if out.resolve().is_relative_to(REPO.resolve()):
        raise SystemExit(f"--out {out} is inside the repository; choose a folder outside it")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        root = data / "segmentation" / split
        images = sorted((root / "images").glob("IDRiD_*.jpg"))
        if not images:
            raise SystemExit(f"no images under {root / 'images'}")
        for code in CODES:
            path = out / f"idrid-seg-{split}-{code}.csv"
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["image", "truth"])
                for image in images:
                    truth = root / code / f"{image.stem}_{code}.png"
                    writer.writerow([str(image.resolve()),
                                     str(truth.resolve()) if truth.is_file() else NO_TRUTH])
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IDRiD folder")
    parser.add_argument("--out", type=Path, required=True, help="folder outside the repository")
    parser.add_argument("--split", choices=["train", "test"], action="append",
                        help="split(s) to write (default both)")
    args = parser.parse_args(argv)
    for path in write_csvs(args.data, args.out, args.split or ("train", "test")):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

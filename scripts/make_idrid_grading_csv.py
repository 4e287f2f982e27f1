#!/usr/bin/env python3
"""Write `dicomnode evaluate` CSVs for the IDRiD disease-grading split (dr-grade, dme-risk).

One classification CSV (`image,label`, image paths relative to the CSV) per split and output,
labels mapped to the model output's class labels:
  {split}_referable_dr.csv   referable (DR grade >= 2) / non-referable
  {split}_dr_grade.csv       none / mild / moderate / severe / proliferative
  {split}_referable_dme.csv  referable (DME risk >= 1) / non-referable
  {split}_dme_risk.csv       0 / 1 / 2
The CSVs go into a folder outside the repository (the data are never copied, only named).

Usage:
  .venv/bin/python scripts/make_idrid_grading_csv.py /tmp/idrid-csv [--split test]
  .venv/bin/dicomnode evaluate dr-grade --output referable_dr \
      --dataset /tmp/idrid-csv/test_referable_dr.csv --json
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "IDRiD" / "grading"
GRADES = ("none", "mild", "moderate", "severe", "proliferative")


def _referable(threshold: int) -> Callable[[int], str]:
    return lambda value: "referable" if value >= threshold else "non-referable"


# output name -> (label column of IDRiD's CSV, mapping to the output's class label)
OUTPUTS: dict[str, tuple[str, Callable[[int], str]]] = {
    "referable_dr": ("dr_grade", _referable(2)),
    "dr_grade": ("dr_grade", lambda value: GRADES[value]),
    "referable_dme": ("dme_risk", _referable(1)),
    "dme_risk": ("dme_risk", str),
}


def write_csvs(data: Path, out: Path, split: str) -> list[Path]:
    labels = data / f"{split}_labels.csv"
    if not labels.is_file():
        raise SystemExit(f"{labels} not found")
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve().is_relative_to(REPO):
        raise SystemExit(f"write the CSVs outside the repository, not into {out}")
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    written = []
    for output, (column, mapping) in OUTPUTS.items():
        path = out / f"{split}_{output}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "label"])
            for row in rows:
                image = (data / split / row["image"]).resolve()
                if not image.is_file():
                    raise SystemExit(f"{image} not found")
                writer.writerow([os.path.relpath(image, out.resolve()),
                                 mapping(int(row[column]))])
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the CSVs (outside the repository)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IDRiD grading folder")
    parser.add_argument("--split", choices=["train", "test"], default="test")
    args = parser.parse_args(argv)
    for path in write_csvs(args.data, args.out, args.split):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

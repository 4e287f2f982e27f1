"""Write CHASE_DB1 evaluation CSVs for `dicomnode evaluate` (outside the repository).

    .venv/bin/python scripts/make_chase_csv.py --data ../shared/data/CHASE_DB1 --out /tmp/chase

Writes `test.csv` (11L-14R, the usual test split), `train.csv` (01L-10R) and `laterality.csv`
(all 28 images, label left/right from the file name), with paths relative to `--out` pointing
into the data folder: the data itself is never copied. Truth is the first observer (1stHO);
no FOV column, so `evaluate` derives the field of view from each image as the node does.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
TEST = [f"{n:02d}{side}" for n in range(11, 15) for side in "LR"]
TRAIN = [f"{n:02d}{side}" for n in range(1, 11) for side in "LR"]


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path.resolve(), out.resolve())


def write(data: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ids in (("test", TEST), ("train", TRAIN)):
        path = out / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "truth"])
            for case in ids:
                image = data / "images" / f"Image_{case}.jpg"
                truth = data / "manual" / f"Image_{case}_1stHO.png"
                for item in (image, truth):
                    if not item.is_file():
                        raise FileNotFoundError(item)
                writer.writerow([_rel(image, out), _rel(truth, out)])
        written.append(path)
    path = out / "laterality.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        for case in TRAIN + TEST:
            image = data / "images" / f"Image_{case}.jpg"
            writer.writerow([_rel(image, out), "left" if case.endswith("L") else "right"])
    written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the CHASE_DB1 folder")
    parser.add_argument("--out", type=Path, required=True, help="where the CSVs go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write(args.data, args.out):
        logger.info("wrote %s", path)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measure the measurement models (vessel-metrics, disc-metrics, optic-disc's diameter) against
the same measurement made on known truth, through `dicomnode evaluate`'s own code.

    .venv/bin/python scripts/measure_metric_models.py [--data ../shared/data] [--seeds 20]

- vessel-metrics, fed by vessel-seg (the graph's default source) and by vessel-seg-classic
  (`--with`), on CHASE_DB1 11L-14R, the images vessel-seg never saw in training: the truth
  is the same figure computed on the first observer's mask at source resolution (density:
  vessel pixels / field-of-view pixels; calibre: 2 x area / boundary pixels, the boundary
  being the mask minus its 3x3 erosion).
  The second observer's figures against the first give the human baseline.
- disc-metrics and optic-disc on the synthetic fundus (both eyes, `--seeds` seeds, 512 px):
  the truth is the generator's disc (diameter 2r, area = pixels within r of its centre), in
  source pixels, which is what the node reports for a `pixel_measure`.
Each set is written as an `image,value` CSV in a temporary folder and measured with
`dicomnode.evaluate.run.evaluate` (MAE and bias, in the reported unit). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from dicomnode.evaluate.dataset import read_dataset
from dicomnode.evaluate.metrics import bias, mean_absolute_error
from dicomnode.evaluate.run import evaluate
from dicomnode.inference.fov import find_field_of_view
from dicomnode.registry import Registry, load_registry
from dicomnode.synthetic import synthetic_fundus_with_truth

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
TEST_IDS = [f"{n:02d}{side}" for n in range(11, 15) for side in "LR"]
SYNTHETIC_SIZE = 512


def _erode3(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    padded = np.pad(mask, 1, constant_values=False)
    out = np.ones_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


def vessel_density(mask: NDArray[np.bool_], fov: NDArray[np.bool_]) -> float:
    return 100.0 * float((mask & fov).sum()) / float(fov.sum())


def vessel_calibre(mask: NDArray[np.bool_], fov: NDArray[np.bool_]) -> float:
    inside = mask & fov
    boundary = inside & ~_erode3(inside)
    return 2.0 * float(inside.sum()) / max(float(boundary.sum()), 1.0)


def _write_csv(path: Path, rows: list[tuple[Path, float]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "value"])
        for image, value in rows:
            writer.writerow([str(image), f"{value:.6f}"])
    return path


def _evaluate(registry: Registry, model: str, output: str, csv_path: Path,
              with_models: tuple[str, ...] = ()) -> dict[str, Any]:
    result = evaluate(read_dataset(csv_path), registry, registry.get(model), output=output,
                      with_models=with_models)
    truth = [float(row.value or 0.0) for row in read_dataset(csv_path).rows]
    return {**result.figures, "images": result.images, "skipped": len(result.skipped),
            "truth_mean": float(np.mean(truth)), "graph": result.graph}


def measure_vessel_metrics(registry: Registry, chase: Path, work: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    measures: dict[str, Callable[[NDArray[np.bool_], NDArray[np.bool_]], float]] = {
        "vessel_density": vessel_density, "vessel_calibre": vessel_calibre}
    first: dict[str, list[float]] = {name: [] for name in measures}
    second: dict[str, list[float]] = {name: [] for name in measures}
    rows: dict[str, list[tuple[Path, float]]] = {name: [] for name in measures}
    for case in TEST_IDS:
        image = chase / "images" / f"Image_{case}.jpg"
        fov = find_field_of_view(np.asarray(Image.open(image).convert("RGB"))).mask
        observers = [np.asarray(Image.open(chase / "manual" / f"Image_{case}_{o}HO.png")
                                .convert("L")) > 0 for o in ("1st", "2nd")]
        for name, measure in measures.items():
            one, two = (measure(m, fov) for m in observers)
            first[name].append(one)
            second[name].append(two)
            rows[name].append((image.resolve(), one))
    for name in measures:
        csv_path = _write_csv(work / f"chase_{name}.csv", rows[name])
        figures[name] = {
            source: _evaluate(registry, "vessel-metrics", name, csv_path, (source,))
            for source in ("vessel-seg", "vessel-seg-classic")}
        figures[name]["second_observer"] = {
            "mae": mean_absolute_error(second[name], first[name]),
            "bias": bias(second[name], first[name])}
    return figures


def measure_disc(registry: Registry, seeds: int, work: Path) -> dict[str, Any]:
    diameters: list[tuple[Path, float]] = []
    areas: list[tuple[Path, float]] = []
    yy, xx = np.mgrid[0:SYNTHETIC_SIZE, 0:SYNTHETIC_SIZE]
    for seed in range(seeds):
        for side in ("L", "R"):
            rgb, truth = synthetic_fundus_with_truth(SYNTHETIC_SIZE, side, seed=seed)
            path = work / f"synthetic_{side}_{seed}.png"
            Image.fromarray(rgb).save(path)
            row, col = truth.disc_center
            disc = np.hypot(yy - row, xx - col) <= truth.disc_radius
            diameters.append((path, 2.0 * truth.disc_radius))
            areas.append((path, float(disc.sum())))
    diameter_csv = _write_csv(work / "synthetic_disc_diameter.csv", diameters)
    area_csv = _write_csv(work / "synthetic_disc_area.csv", areas)
    return {
        "disc-metrics": {
            "disc_diameter": _evaluate(registry, "disc-metrics", "disc_diameter", diameter_csv),
            "disc_area": _evaluate(registry, "disc-metrics", "disc_area", area_csv),
        },
        "optic-disc": {
            "disc_diameter": _evaluate(registry, "optic-disc", "disc_diameter", diameter_csv),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--registry", type=Path, default=ROOT / "model_registry")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    registry = load_registry(args.registry)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        chase = args.data / "CHASE_DB1"
        if (chase / "images").is_dir():
            report["vessel-metrics (CHASE_DB1 11L-14R)"] = measure_vessel_metrics(
                registry, chase, work)
        else:
            report["vessel-metrics"] = f"skipped: {chase} not found"
        report.update({f"{k} (synthetic, {2 * args.seeds} images)": v
                       for k, v in measure_disc(registry, args.seeds, work).items()})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

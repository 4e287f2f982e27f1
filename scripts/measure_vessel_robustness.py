"""Measure how the vessel models hold up on images imitating other fundus cameras.

    .venv/bin/python scripts/measure_vessel_robustness.py [--data ../shared/data] \
        [--models vessel-seg vessel-seg-classic]

For each model, the CHASE_DB1 test images 11L-14R (first observer's truth) are run unmodified
and as simulated other-camera variants: rescaled 0.5x and 2x (resolution), gamma 0.6 and 1.5
(exposure), a warm colour cast, JPEG re-compression at quality 50, the frame padded with
black to 4:3 and to 16:9 (rectangular sensors) and a smaller field of view (a circular
aperture of 80 % of the original field diameter). Geometric changes are applied to the truth
as well (nearest neighbour); the aperture masks the truth. Variants are written to a
temporary folder with an `image,truth` CSV and measured by `dicomnode.evaluate.run.evaluate`
on the shipped registry, i.e. exactly as `dicomnode evaluate` measures (the node's executor,
pre- and post-processing, the fundus-quality gate, metrics inside the field of view found in
each image, at the variant's resolution). The data are never copied into the repository.

Two controls split a variant's change into the model's part and the scoring's part: the
unmodified images scored only inside the aperture circle (compare aperture_80% with it), and
the unmodified result taken to the 0.5x grid by nearest neighbour (compare scale_0.5x with
it); `delta_to_control` gives those differences. `--variants NAME...` runs only some.

Also runs each model on the real adult fundus NEMA WG-04 VL4 (another camera, decoded the
node's way) and reports the fraction of its field of view marked as vessel; there is no
vessel truth for that image, so it is not an accuracy figure.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image

from dicomnode.evaluate.dataset import DatasetError, load_mask, load_rgb, read_dataset
from dicomnode.evaluate.metrics import Counts, roc_auc, segmentation_counts, segmentation_figures
from dicomnode.evaluate.run import ModelRunner, evaluate
from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.fov import find_field_of_view
from dicomnode.inference.postprocess import mask_to_source
from dicomnode.registry.loader import load_registry
from dicomnode.registry.manifest import MaskOutput
from dicomnode.registry.registry import ModelEntry, Registry

logger = logging.getLogger("measure_vessel_robustness")

REPO = Path(__file__).resolve().parent.parent
TEST = [f"{n:02d}{side}" for n in range(11, 15) for side in "LR"]
MODELS = ["vessel-seg", "vessel-seg-classic"]
NEMA_VL4 = Path("dicom-samples/NEMA_WG04/J2KI/VL4_J2KI")
FIGURES = ("dice", "auc", "sensitivity", "specificity")
BASELINE = "original"
APERTURE = 0.8
# Controls: the unmodified images scored the way two variants are scored, so that a variant's
# change can be split into what the model does and what the scoring region/resolution does.
IN_APERTURE = "original_in_aperture_80%"
AT_HALF = "original_scored_at_0.5x"

RGB = NDArray[np.uint8]
Mask = NDArray[np.bool_]
Transform = Callable[[RGB, Mask], tuple[RGB, Mask]]


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    transform: Transform
    jpeg_quality: int | None = None  # write the image as JPEG at this quality (else PNG)


def _rescale(factor: float) -> Transform:
    def apply(rgb: RGB, truth: Mask) -> tuple[RGB, Mask]:
        height, width = truth.shape
        size = (round(width * factor), round(height * factor))
        # Area averaging imitates a lower-resolution sensor; bicubic a higher-resolution one.
        method = Image.Resampling.BOX if factor < 1 else Image.Resampling.BICUBIC
        image = np.array(Image.fromarray(rgb).resize(size, method), dtype=np.uint8)
        mask = Image.fromarray(truth.astype(np.uint8) * 255).resize(
            size, Image.Resampling.NEAREST)
        return image, np.asarray(mask, dtype=np.uint8) > 0
    return apply


def _gamma(gamma: float) -> Transform:
    table = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)

    def apply(rgb: RGB, truth: Mask) -> tuple[RGB, Mask]:
        return table[rgb], truth
    return apply


def _colour_cast(gains: tuple[float, float, float]) -> Transform:
    factors = np.asarray(gains, dtype=np.float32)

    def apply(rgb: RGB, truth: Mask) -> tuple[RGB, Mask]:
        cast = np.clip(np.rint(rgb.astype(np.float32) * factors), 0, 255).astype(np.uint8)
        return cast, truth
    return apply


def _unchanged(rgb: RGB, truth: Mask) -> tuple[RGB, Mask]:
    return rgb, truth


def _pad_to_aspect(aspect: float) -> Transform:
    """Pad with black left and right (top and bottom if taller) to width:height = aspect."""
    def apply(rgb: RGB, truth: Mask) -> tuple[RGB, Mask]:
        height, width = truth.shape
        if width < height * aspect:
            new_width, new_height = round(height * aspect), height
        else:
            new_width, new_height = width, round(width / aspect)
        top, left = (new_height - height) // 2, (new_width - width) // 2
        image = np.zeros((new_height, new_width, 3), dtype=np.uint8)
        image[top:top + height, left:left + width] = rgb
        mask = np.zeros((new_height, new_width), dtype=np.bool_)
        mask[top:top + height, left:left + width] = truth
        return image, mask
    return apply


def _circle(rgb: RGB, fraction: float) -> Mask:
    """A disc of `fraction` of the field-of-view diameter, centred on the field of view found
    the node's way."""
    box = find_field_of_view(rgb).box
    centre_y, centre_x = (box.top + box.bottom - 1) / 2, (box.left + box.right - 1) / 2
    radius = fraction * max(box.height, box.width) / 2
    rows, cols = np.ogrid[:rgb.shape[0], :rgb.shape[1]]
    inside: Mask = (rows - centre_y) ** 2 + (cols - centre_x) ** 2 <= radius ** 2
    return inside


def _aperture(fraction: float) -> Transform:
    """Black out everything outside a circle of `fraction` of the field-of-view diameter;
    the truth is masked to it."""
    def apply(rgb: RGB, truth: Mask) -> tuple[RGB, Mask]:
        inside = _circle(rgb, fraction)
        image = np.where(inside[..., None], rgb, np.uint8(0)).astype(np.uint8)
        return image, truth & inside
    return apply


VARIANTS = [
    Variant("scale_0.5x", "image area-averaged to 0.5x (500 x 480), truth nearest",
            _rescale(0.5)),
    Variant("scale_2x", "image bicubic to 2x (1998 x 1920), truth nearest", _rescale(2.0)),
    Variant("gamma_0.6", "brighter: out = in^0.6", _gamma(0.6)),
    Variant("gamma_1.5", "darker: out = in^1.5", _gamma(1.5)),
    Variant("warm_cast", "red x1.15, green x1.0, blue x0.7 (redder/yellower camera)",
            _colour_cast((1.15, 1.0, 0.7))),
    Variant("jpeg_q50", "re-compressed as JPEG quality 50 (4:2:0)", _unchanged, 50),
    Variant("pad_4:3", "black added left and right to a 4:3 frame (1280 x 960)",
            _pad_to_aspect(4 / 3)),
    Variant("pad_16:9", "black added left and right to a 16:9 frame (1707 x 960)",
            _pad_to_aspect(16 / 9)),
    Variant("aperture_80%", "outside a circle of 80 % of the field diameter blacked out, "
            "truth masked to it", _aperture(APERTURE)),
]


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())


def write_original(chase: Path, folder: Path) -> Path:
    """The unmodified test set: a CSV pointing at the data folder (nothing copied)."""
    folder.mkdir(parents=True)
    path = folder / "dataset.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "truth"])
        for case in TEST:
            image = chase / "images" / f"Image_{case}.jpg"
            truth = chase / "manual" / f"Image_{case}_1stHO.png"
            for item in (image, truth):
                if not item.is_file():
                    raise FileNotFoundError(item)
            writer.writerow([_rel(image, folder), _rel(truth, folder)])
    return path


def write_variant(chase: Path, variant: Variant, folder: Path) -> Path:
    """Transform every test image and its truth; write them and an `image,truth` CSV."""
    folder.mkdir(parents=True)
    path = folder / "dataset.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "truth"])
        for case in TEST:
            rgb = load_rgb(chase / "images" / f"Image_{case}.jpg")
            truth = load_mask(chase / "manual" / f"Image_{case}_1stHO.png")
            image, mask = variant.transform(rgb, truth)
            if variant.jpeg_quality is not None:
                image_name = f"Image_{case}.jpg"
                Image.fromarray(image).save(folder / image_name, quality=variant.jpeg_quality)
            else:
                image_name = f"Image_{case}.png"
                Image.fromarray(image).save(folder / image_name)
            truth_name = f"Image_{case}_truth.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / truth_name)
            writer.writerow([image_name, truth_name])
    return path


def write_in_aperture(chase: Path, folder: Path) -> Path:
    """Control for the aperture: the unmodified images, scored only inside the same circle
    (an `image,truth,fov` CSV; the fov is the circle within the node's field of view)."""
    folder.mkdir(parents=True)
    path = folder / "dataset.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "truth", "fov"])
        for case in TEST:
            image = chase / "images" / f"Image_{case}.jpg"
            truth = chase / "manual" / f"Image_{case}_1stHO.png"
            rgb = load_rgb(image)
            fov = find_field_of_view(rgb).mask & _circle(rgb, APERTURE)
            fov_name = f"Image_{case}_fov.png"
            Image.fromarray(fov.astype(np.uint8) * 255).save(folder / fov_name)
            writer.writerow([_rel(image, folder), _rel(truth, folder), fov_name])
    return path


def scored_at_half(registry: Registry, entry: ModelEntry, chase: Path) -> dict[str, Any]:
    """Control for scale_0.5x: the model run on the unmodified images, its probability map and
    decision taken down to 0.5x by nearest neighbour and scored against the same 0.5x truth
    and field of view as the scale_0.5x variant. What the variant loses beyond this is the
    model's; what this loses is the nearest-neighbour scoring grid's."""
    spec = next(o for o in entry.manifest.outputs if isinstance(o, MaskOutput))
    runner = ModelRunner(registry, entry, ["CPUExecutionProvider"])
    half = _rescale(0.5)
    total = Counts()
    scores: list[NDArray[np.float32]] = []
    labels: list[Mask] = []
    for index, case in enumerate(TEST):
        rgb = load_rgb(chase / "images" / f"Image_{case}.jpg")
        truth = load_mask(chase / "manual" / f"Image_{case}_1stHO.png")
        uid = f"2.25.{index + 1}"
        result, reason = runner.run(rgb, uid)
        if reason is not None:
            return {"error": f"{case} skipped: {reason}"}
        probability = mask_to_source(result.raw[spec.name][uid], result.geometry[uid])
        small_rgb, small_truth = half(rgb, truth)
        height, width = small_truth.shape
        small_probability = np.asarray(Image.fromarray(probability, mode="F").resize(
            (width, height), Image.Resampling.NEAREST), dtype=np.float32)
        fov = find_field_of_view(small_rgb).mask
        total = total + segmentation_counts(
            small_probability >= np.float32(spec.threshold), small_truth, fov)
        scores.append(small_probability[fov])
        labels.append(small_truth[fov])
    out: dict[str, Any] = {
        name: _finite(value) for name, value in segmentation_figures(total).items()
        if name in FIGURES}
    out["auc"] = _finite(roc_auc(np.concatenate(scores), np.concatenate(labels)))
    out["images"] = len(TEST)
    out["skipped"] = {}
    return {key: out[key] for key in (*FIGURES, "images", "skipped")}


def _finite(value: Any) -> float | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return round(float(value), 4)


def measure(registry: Registry, entry: ModelEntry, csv_path: Path) -> dict[str, Any]:
    dataset = read_dataset(csv_path)
    try:
        result = evaluate(dataset, registry, entry)
    except DatasetError as exc:  # e.g. every image stopped by the quality gate
        return {"error": str(exc)}
    out: dict[str, Any] = {name: _finite(result.figures[name]) for name in FIGURES}
    out["images"] = result.images
    out["skipped"] = {Path(k).name: v for k, v in result.skipped.items()}
    return out


def _delta(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    return {
        key: None if row[key] is None or base[key] is None else round(row[key] - base[key], 4)
        for key in FIGURES
    }


def _with_deltas(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`delta`: to the unmodified set; `delta_to_control`: to the same images scored in the
    same region / on the same grid (aperture_80% and scale_0.5x)."""
    base = rows[BASELINE]
    controls = {"aperture_80%": IN_APERTURE, "scale_0.5x": AT_HALF}
    for name, row in rows.items():
        if name == BASELINE or "error" in row or "error" in base:
            continue
        row["delta"] = _delta(row, base)
        control = rows.get(controls.get(name, ""))
        if control is not None and "error" not in control:
            row["delta_to_control"] = _delta(row, control)
    return rows


def vessel_fraction(registry: Registry, entry: ModelEntry, path: Path) -> dict[str, Any]:
    """Fraction of the field of view marked as vessel on one truthless DICOM fundus."""
    rgb = decode_rgb(pydicom.dcmread(path))
    spec = next(o for o in entry.manifest.outputs if isinstance(o, MaskOutput))
    runner = ModelRunner(registry, entry, ["CPUExecutionProvider"])
    uid = "2.25.1"
    result, reason = runner.run(rgb, uid)
    info: dict[str, Any] = {"image": path.name, "size": [int(rgb.shape[1]), int(rgb.shape[0])]}
    if reason is not None:
        info["skipped"] = reason
        return info
    probability = mask_to_source(result.raw[spec.name][uid], result.geometry[uid])
    fov = find_field_of_view(rgb).mask
    marked = probability[fov] >= np.float32(spec.threshold)
    info["fov_fraction_marked_vessel"] = round(float(marked.mean()), 4)
    info["note"] = "no vessel truth exists for this image: not an accuracy figure"
    return info


def _folder(name: str) -> str:
    return name.replace(":", "x").replace("%", "pc")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding CHASE_DB1/ and dicom-samples/ "
                             "(default ../shared/data relative to the repository)")
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="ID[@VERSION]",
                        help=f"models to measure (default: {' '.join(MODELS)})")
    parser.add_argument("--registry", type=Path, default=REPO / "model_registry",
                        help="model registry (default: the repository's model_registry)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="only these variants and controls (the unmodified set always "
                             "runs); default: all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("dicomnode",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    chase = args.data / "CHASE_DB1"
    registry = load_registry(args.registry)
    entries = []
    for ref in args.models:
        model_id, _, version = str(ref).partition("@")
        entries.append(registry.get(model_id, version or None))
    report: dict[str, Any] = {
        "dataset": "CHASE_DB1 11L-14R (8 images, 999 x 960), first observer (1stHO) as truth",
        "measured_with": "dicomnode.evaluate.run.evaluate (as `dicomnode evaluate`), CPU",
        "variants": {BASELINE: "unmodified", **{v.name: v.description for v in VARIANTS},
                     IN_APERTURE: "control: unmodified images scored only inside the "
                                  "aperture_80% circle (compare aperture_80% with it)",
                     AT_HALF: "control: prediction on the unmodified images, taken to 0.5x "
                              "by nearest neighbour and scored like scale_0.5x (compare "
                              "scale_0.5x with it)"},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="vessel-robustness-") as tmp:
        root = Path(tmp)
        wanted = set(args.variants or [v.name for v in VARIANTS] + [IN_APERTURE, AT_HALF])
        csvs = {BASELINE: write_original(chase, root / BASELINE)}
        for variant in VARIANTS:
            if variant.name in wanted:
                csvs[variant.name] = write_variant(chase, variant, root / _folder(variant.name))
        if IN_APERTURE in wanted:
            csvs[IN_APERTURE] = write_in_aperture(chase, root / _folder(IN_APERTURE))
        logger.info("variants written in %.1f s", time.perf_counter() - started)
        for entry in entries:
            rows: dict[str, dict[str, Any]] = {}
            for name, path in csvs.items():
                tick = time.perf_counter()
                rows[name] = measure(registry, entry, path)
                logger.info("%s %s: %s (%.1f s)", entry.manifest.key, name,
                            {k: rows[name].get(k) for k in ("dice", "auc", "images")},
                            time.perf_counter() - tick)
            if AT_HALF in wanted:
                rows[AT_HALF] = scored_at_half(registry, entry, chase)
                logger.info("%s %s: %s", entry.manifest.key, AT_HALF, rows[AT_HALF])
            report["models"][entry.manifest.key] = {
                "threshold": next(o.threshold for o in entry.manifest.outputs
                                  if isinstance(o, MaskOutput)),
                "variants": _with_deltas(rows),
                "nema_vl4": vessel_fraction(registry, entry, args.data / NEMA_VL4),
            }
    report["seconds"] = round(time.perf_counter() - started, 1)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How much of a healthy eye each lesion-seg version marks: the other-camera check.

    .venv/bin/python scripts/measure_lesion_false_positives.py [--versions 1.1.0 1.2.0]

CHASE_DB1's 28 photographs (Nidek NM-200-D, 30°, healthy children) have no lesions, so every
marked pixel is a false positive; there is no lesion truth for another camera here, so this is
the only other-camera figure a lesion model can have. Each version runs the node's way (its
graph behind fundus-quality, crop / resize / map-back, the manifest's thresholds); the figure
is the fraction of the image's field of view (the node's own detection, source resolution)
marked by each output: the mean and the largest over the eyes, and how many eyes have more
than 0.5 % marked. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomnode.evaluate.dataset import load_rgb  # noqa: E402
from dicomnode.evaluate.run import ModelRunner  # noqa: E402
from dicomnode.inference.fov import find_field_of_view  # noqa: E402
from dicomnode.inference.postprocess import mask_to_source  # noqa: E402
from dicomnode.registry.loader import load_registry  # noqa: E402
from dicomnode.registry.manifest import MaskOutput  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "CHASE_DB1"
MARKED_EYE = 0.005  # more than 0.5 % of the field of view


def marked_fractions(registry_path: Path, version: str, images: Sequence[Path]) -> dict[str, Any]:
    registry = load_registry(registry_path)
    entry = registry.get("lesion-seg", version)
    runner = ModelRunner(registry, entry, ["CPUExecutionProvider"])
    specs = [o for o in entry.manifest.outputs if isinstance(o, MaskOutput)]
    fractions: dict[str, list[float]] = {s.name: [] for s in specs}
    skipped: dict[str, str] = {}
    for index, path in enumerate(images):
        rgb = load_rgb(path)
        uid = f"2.25.{index + 1}"
        result, reason = runner.run(rgb, uid)
        if reason is not None:
            skipped[path.name] = reason
            continue
        fov = find_field_of_view(rgb).mask
        for spec in specs:
            probability = mask_to_source(result.raw[spec.name][uid], result.geometry[uid])
            marked = (probability >= np.float32(spec.threshold)) & fov
            fractions[spec.name].append(float(marked.sum() / fov.sum()))
    figures: dict[str, Any] = {
        name: {"mean_percent": round(100 * float(np.mean(values)), 2),
               "max_percent": round(100 * float(np.max(values)), 2),
               "eyes_over_0.5_percent": int(sum(v > MARKED_EYE for v in values))}
        for name, values in fractions.items() if values}
    return {"version": version, "images": len(images) - len(skipped), "skipped": skipped,
            "outputs": figures}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CHASE_DB1 folder")
    parser.add_argument("--registry", type=Path, default=REPO / "model_registry")
    parser.add_argument("--versions", nargs="+", default=["1.1.0", "1.2.0"])
    args = parser.parse_args(argv)
    images = sorted((args.data / "images").glob("Image_*.jpg"))
    if not images:
        raise SystemExit(f"no CHASE_DB1 images under {args.data / 'images'}")
    print(json.dumps([marked_fractions(args.registry, v, images) for v in args.versions],
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

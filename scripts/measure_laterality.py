"""Measure laterality on every labelled L/R image here, and choose the "unknown" confidence.

    .venv/bin/python scripts/measure_laterality.py [--data ../shared/data] [--model PATH]

Labels:
- CHASE_DB1 (28, disc-centred): the L/R in the file names. 1.0.0's convention (macula and
  temporal retina to the viewer's left of the disc = right eye) scores 28/28 on them, which is
  the check that the convention is the standard display one.
- IDRiD segmentation sets (54 train / 27 test, macula-centred): from the optic-disc MASK that
  comes with each image (independent of the model): with the macula at the centre, the disc's
  centroid to the viewer's RIGHT of the image centre = right eye (the same convention: the
  macula lies to the viewer's left of the disc), LEFT = left eye.
The IDRiD grading images have no disc masks; they are not used (a label from a disc detector
would not be independent of the model, which uses the same detector).

The model measured is 1.1.0 as scripts/make_laterality_unknown.py builds it (disc-side rule
for |dx| >= FAR, 1.0.0's cues for |dx| < NEAR, unknown between), with its side probability
`lat_p` read as an extra output. The confidence below which it says "unknown" is chosen on the
tuning images only (CHASE 01-07 and IDRiD segmentation train): the c on a 0.50-0.95 grid with
the best accuracy where it answers there (the smallest of equals). The held-out images (CHASE 08-14,
IDRiD segmentation test) are reported at that c; then the shipped model.onnx is run on every
image and must give the same answers. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from make_laterality_unknown import SOURCE, with_unknown  # the sibling script (same folder)
from numpy.typing import NDArray
from PIL import Image

from dicomnode.inference.preprocess import SourceImage, prepare
from dicomnode.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent

GRID = [round(0.5 + 0.05 * k, 2) for k in range(10)]


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3)]


def _labelled(data: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for path in sorted((data / "CHASE_DB1" / "images").glob("Image_*.jpg")):
        number = int(path.stem[6:8])
        items.append({"set": "CHASE_DB1", "split": "tuning" if number <= 7 else "held-out",
                      "image": path.name, "path": path, "right": path.stem.endswith("R")})
    for split, role in (("train", "tuning"), ("test", "held-out")):
        folder = data / "IDRiD" / "segmentation" / split
        for path in sorted((folder / "images").glob("*.jpg")):
            mask = np.array(Image.open(folder / "OD" / f"{path.stem}_OD.png")) > 0
            xs = np.nonzero(mask)[1]
            if not len(xs):
                continue
            right = float(xs.mean()) > mask.shape[1] / 2
            items.append({"set": "IDRiD segmentation", "split": role, "image": path.name,
                          "path": path, "right": right,
                          "disc_x": round(float(xs.mean()) / mask.shape[1], 3)})
    return items


def _measuring_session() -> ort.InferenceSession:
    """1.1.0's graph at confidence 0.5 with the side probability `lat_p` and the disc centre
    as extra outputs."""
    model = with_unknown(onnx.load(SOURCE), 0.5)
    for name, width in (("lat_p", 2), ("laterality_disc_centre", 2)):
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None, width]))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, spec: Any, rgb: NDArray[np.uint8]
         ) -> dict[str, NDArray[Any]]:
    tensor, _ = prepare(SourceImage("1.2.3", rgb), spec)
    names = [o.name for o in session.get_outputs()]
    return {n: v[0] for n, v in zip(names, session.run(None, {spec.name: tensor[None]}),
                                    strict=True)}


def _answers(row: dict[str, Any], confidence: float) -> bool:
    return bool(max(row["p_left"], row["p_right"]) >= confidence)


def _summary(rows: list[dict[str, Any]], confidence: float) -> dict[str, Any]:
    answered = [r for r in rows if _answers(r, confidence)]
    right = sum(int((r["p_right"] >= r["p_left"]) == r["right"]) for r in answered)
    unknown = len(rows) - len(answered)
    return {
        "n": len(rows), "answered": len(answered), "correct": right,
        "accuracy_where_answered": round(right / len(answered), 3) if answered else None,
        "accuracy_ci95": wilson(right, len(answered)),
        "unknown": unknown, "unknown_rate": round(unknown / len(rows), 3) if rows else None,
        "unknown_ci95": wilson(unknown, len(rows)),
        "by_branch": {b: sum(r["branch"] == b for r in rows) for b in ("disc side", "cues",
                                                                        "between")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("-v", "--verbose", action="store_true", help="p_right per image")
    args = parser.parse_args()
    shipped_entry = load_registry(ROOT / "model_registry").get("laterality", "1.1.0")
    spec = shipped_entry.manifest.tensor_inputs[0]
    session = _measuring_session()
    shipped = ort.InferenceSession(str(shipped_entry.onnx_path),
                                   providers=["CPUExecutionProvider"])
    labels = [c.label for c in shipped_entry.manifest.outputs[0].classes]  # type: ignore[union-attr]
    rows = _labelled(args.data)
    for row in rows:
        rgb = np.array(Image.open(row.pop("path")).convert("RGB"))
        values = _run(session, spec, rgb)
        row["p_left"], row["p_right"] = (round(float(v), 4) for v in values["lat_p"])
        dx = float(values["laterality_disc_centre"][0]) - 0.5
        row["disc_dx"] = round(dx, 3)
        row["branch"] = ("disc side" if abs(dx) >= 0.21 else "cues" if abs(dx) < 0.12
                         else "between")
        answer = _run(shipped, spec, rgb)["laterality"]
        row["shipped"] = labels[int(np.argmax(answer))]
    tuning = [r for r in rows if r["split"] == "tuning"]
    # The confidence with the best accuracy where it answers on the tuning images (the
    # smallest of equals: fewer unknowns).
    chosen = max(GRID, key=lambda c: ((_summary(tuning, c)["accuracy_where_answered"] or 0),
                                      -c))
    report: dict[str, Any] = {
        "confidence": chosen, "grid_on_tuning": {c: _summary(tuning, c) for c in GRID},
    }
    for split in ("tuning", "held-out"):
        part = [r for r in rows if r["split"] == split]
        report[split] = {"all": _summary(part, chosen)}
        for name in ("CHASE_DB1", "IDRiD segmentation"):
            report[split][name] = _summary([r for r in part if r["set"] == name], chosen)
    report["all"] = _summary(rows, chosen)
    shipped_confidence = float(onnx.numpy_helper.to_array(next(
        t for t in onnx.load(str(shipped_entry.onnx_path)).graph.initializer
        if t.name == "lat_confidence")))
    report["shipped_confidence"] = round(shipped_confidence, 3)
    expected = {id(r): ("unknown" if not _answers(r, shipped_confidence) else
                        "right" if r["p_right"] >= r["p_left"] else "left") for r in rows}
    report["shipped_agrees"] = all(r["shipped"] == expected[id(r)] for r in rows)
    if args.verbose:
        report["images"] = rows
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

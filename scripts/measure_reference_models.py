"""Measure the hand-designed reference models (optic-disc, laterality, fundus-quality).

    .venv/bin/python scripts/measure_reference_models.py [--data ../shared/data] [--seeds 20]

Runs each ONNX model the way the node does (FOV square crop, resize, normalise: the manifest's
input spec through `dicomnode.inference.preprocess.prepare`) on:
- the synthetic fundus (`dicomnode.synthetic`), both eyes, `--seeds` seeds: disc centre error
  and mask Dice against the generator's disc, laterality accuracy, quality on clean images;
- CHASE_DB1 (28 images, L/R in the names): laterality accuracy and AUC (all, and split into
  01-07, where the laterality constants were chosen, and the held-out 08-14), also of each of its
  two cues alone (macula, vessel arcades: the graph's `laterality_macula` / `laterality_arcade`
  tensors, read as extra outputs) and leave-one-subject-out with the two cue scales refitted on
  the other 13 subjects; disc found inside FOV; the laterality the NEMA VL4 fundus gets (its eye
  is not recorded);
- fundus-quality on CHASE + the NEMA VL4 fundus (gradable) and controlled degradations of
  them (blur, under-/over-exposure, off-centre, partial field; ungradable): AUC, sensitivity,
  specificity at the manifest threshold.
Prints one JSON object; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pydicom
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from dicomnode.evaluate.metrics import roc_auc
from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.postprocess import mask_to_source, point_to_source
from dicomnode.inference.preprocess import SourceImage, prepare
from dicomnode.registry import Registry, load_registry
from dicomnode.registry.manifest import MaskOutput, PointOutput, ProbabilitiesOutput
from dicomnode.synthetic import synthetic_fundus_with_truth

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


class Runner:
    """One model, run on one image as the executor would."""

    def __init__(self, registry: Registry, model_id: str) -> None:
        self.entry = registry.get(model_id)
        self.session = ort.InferenceSession(str(self.entry.onnx_path),
                                            providers=["CPUExecutionProvider"])

    def __call__(self, rgb: NDArray[np.uint8]) -> tuple[dict[str, NDArray[Any]], Any]:
        spec = self.entry.manifest.tensor_inputs[0]
        tensor, geometry = prepare(SourceImage("1.2.3", rgb), spec)
        names = [o.name for o in self.session.get_outputs()]
        values = self.session.run(None, {spec.name: tensor[None]})
        return {n: np.asarray(v)[0] for n, v in zip(names, values, strict=True)}, geometry

    def output(self, name: str) -> Any:
        return next(o for o in self.entry.manifest.outputs if o.name == name)

    def expose(self, tensors: tuple[str, ...]) -> None:
        """Also return these intermediate tensors of the graph (measurement only)."""
        model = onnx.load(str(self.entry.onnx_path))
        for name in tensors:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])


LATERALITY_CUES = ("laterality_macula", "laterality_arcade")  # > 0: right eye


def _cue_figures(cues: NDArray[np.float64], right: NDArray[np.bool_]) -> dict[str, Any]:
    """Accuracy (sign) and AUC of each laterality cue alone."""
    return {name.removeprefix("laterality_"): {"accuracy": float(np.mean((c > 0) == right)),
                                               "auc": roc_auc(c, right)}
            for name, c in zip(LATERALITY_CUES, cues.T, strict=True)}


def _loso(cues: NDArray[np.float64], right: NDArray[np.bool_],
          subject: NDArray[np.int64]) -> dict[str, Any]:
    """Leave one subject (both eyes) out: the cue scales (root mean square) refitted on the rest."""
    z = np.zeros(len(right))
    for s in np.unique(subject):
        test = subject == s
        scale = np.sqrt(np.mean(cues[~test] ** 2, axis=0))
        z[test] = (cues[test] / scale).sum(axis=1)
    return {"images": len(right), "subjects": len(np.unique(subject)),
            "accuracy": float(np.mean((z > 0) == right)), "auc": roc_auc(z, right),
            "wrong": [int(s) for s, ok in zip(subject, (z > 0) == right, strict=True) if not ok]}


def degradations(rgb: NDArray[np.uint8]) -> dict[str, NDArray[np.uint8]]:
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb)
    blur_r = max(h, w) / 120.0
    shift = np.zeros_like(rgb)
    dx = int(w * 0.45)
    shift[:, dx:] = rgb[:, : w - dx]
    partial = rgb.copy()
    partial[: int(h * 0.55)] = 0
    return {
        "blur": np.array(img.filter(ImageFilter.GaussianBlur(blur_r))),
        "dark": np.clip(rgb.astype(np.float32) * 0.15, 0, 255).astype(np.uint8),
        "over": np.clip(rgb.astype(np.float32) * 3.5 + 40, 0, 255).astype(np.uint8),
        "off_centre": shift,
        "partial": partial,
    }


def _dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def measure(data: Path | None, seeds: int) -> dict[str, Any]:
    registry = load_registry(ROOT / "model_registry")
    disc = Runner(registry, "optic-disc")
    lat = Runner(registry, "laterality")
    lat.expose(LATERALITY_CUES)
    qual = Runner(registry, "fundus-quality")
    q_spec = qual.output("quality")
    assert isinstance(q_spec, ProbabilitiesOutput)
    l_spec = lat.output("laterality")
    assert isinstance(l_spec, ProbabilitiesOutput)
    m_spec = disc.output("disc_probability")
    c_spec = disc.output("disc_centre")
    assert isinstance(m_spec, MaskOutput) and isinstance(c_spec, PointOutput)
    out: dict[str, Any] = {}

    errors: list[float] = []
    dices: list[float] = []
    inside: list[bool] = []
    lat_ok: list[bool] = []
    syn_cues: list[list[float]] = []
    syn_right: list[bool] = []
    q_syn: list[float] = []
    for seed in range(seeds):
        for side in ("L", "R"):
            rgb, truth = synthetic_fundus_with_truth(512, side, seed)
            raw, geo = disc(rgb)
            x, y = point_to_source(raw["disc_centre"], c_spec, geo)
            ty, tx = truth.disc_center
            err = float(np.hypot(x - tx, y - ty))
            errors.append(err)
            inside.append(err <= truth.disc_radius)
            yy, xx = np.mgrid[0:512, 0:512]
            true_mask = np.hypot(yy - ty, xx - tx) <= truth.disc_radius
            mask = mask_to_source(raw["disc_probability"], geo) >= m_spec.threshold
            dices.append(_dice(mask, true_mask))
            lraw, _ = lat(rgb)
            synthetic_right = float(lraw["laterality"][1])
            lat_ok.append((synthetic_right >= 0.5) == (side == "R"))
            syn_cues.append([float(lraw[c][0]) for c in LATERALITY_CUES])
            syn_right.append(side == "R")
            qraw, _ = qual(rgb)
            q_syn.append(float(qraw["quality"][0]))
    out["synthetic"] = {
        "images": len(errors), "size": 512,
        "disc_centre_error_px": {"mean": float(np.mean(errors)), "max": float(np.max(errors))},
        "disc_centre_inside_true_disc": float(np.mean(inside)),
        "disc_mask_dice": {"mean": float(np.mean(dices)), "min": float(np.min(dices))},
        "laterality_accuracy": float(np.mean(lat_ok)),
        "laterality_cues": _cue_figures(np.array(syn_cues), np.array(syn_right)),
        "quality_p_gradable_min": float(np.min(q_syn)),
    }

    if data is None or not (data / "CHASE_DB1" / "images").is_dir():
        return out
    chase = sorted((data / "CHASE_DB1" / "images").glob("Image_*.jpg"))
    gradable: list[tuple[str, NDArray[np.uint8]]] = [
        (p.stem, np.array(Image.open(p).convert("RGB"))) for p in chase
    ]
    vl4 = data / "dicom-samples" / "NEMA_WG04" / "J2KI" / "VL4_J2KI"
    if vl4.is_file():
        gradable.append(("VL4", decode_rgb(pydicom.dcmread(vl4))))
    p_right: list[float] = []
    cue_rows: list[list[float]] = []
    truth_right: list[bool] = []
    in_fov: list[bool] = []
    for name, rgb in gradable:
        if not name.startswith("Image_"):
            lraw, _ = lat(rgb)  # VL4: laterality not recorded, so only the prediction
            out["vl4_laterality_p_right"] = float(lraw["laterality"][1])
            out["vl4_laterality_cues"] = {c.removeprefix("laterality_"): float(lraw[c][0])
                                          for c in LATERALITY_CUES}
            continue
        lraw, _ = lat(rgb)
        p_right.append(float(lraw["laterality"][1]))
        cue_rows.append([float(lraw[c][0]) for c in LATERALITY_CUES])
        truth_right.append(name.endswith("R"))
        raw, geo = disc(rgb)
        x, y = point_to_source(raw["disc_centre"], c_spec, geo)
        fov = np.asarray(rgb).max(axis=2) > 15
        in_fov.append(bool(fov[round(y), round(x)]))
        logger.info("%s p_right=%.2f macula=%+.4f arcade=%+.4f disc=(%.0f,%.0f) d=%.1f", name,
                    p_right[-1], *cue_rows[-1], x, y,
                    float(np.asarray(raw["disc_diameter"]).reshape(-1)[0]))
    pr = np.array(p_right)
    tr = np.array(truth_right)
    cues = np.array(cue_rows)
    number = np.array([int(p.stem[6:8]) for p in chase])
    out["chase_laterality"] = {
        "images": len(pr), "accuracy": float(np.mean((pr >= 0.5) == tr)),
        "auc": roc_auc(pr, tr), "disc_centre_inside_fov": float(np.mean(in_fov)),
        "cues": _cue_figures(cues, tr),
    }
    out["chase_laterality_loso"] = _loso(cues, tr, number)
    # the laterality constants were chosen on 01-07 (both eyes); 08-14 are held out
    for split, sel in (("chase_laterality_01_07", number <= 7),
                       ("chase_laterality_08_14", number >= 8)):
        out[split] = {"images": int(sel.sum()),
                      "accuracy": float(np.mean((pr[sel] >= 0.5) == tr[sel])),
                      "auc": roc_auc(pr[sel], tr[sel]),
                      "wrong": [p.stem for p, ok, s in zip(chase, (pr >= 0.5) == tr, sel,
                                                           strict=True) if s and not ok],
                      "cues": _cue_figures(cues[sel], tr[sel])}
    scores: list[float] = []
    labels: list[bool] = []
    per_kind: dict[str, list[float]] = {}
    threshold = q_spec.threshold if q_spec.threshold is not None else 0.5
    for _name, rgb in gradable:
        raw, _ = qual(rgb)
        scores.append(float(raw["quality"][0]))
        labels.append(True)
        per_kind.setdefault("original", []).append(scores[-1])
        for kind, bad in degradations(rgb).items():
            raw, _ = qual(bad)
            scores.append(float(raw["quality"][0]))
            labels.append(False)
            per_kind.setdefault(kind, []).append(scores[-1])
    s = np.array(scores)
    lab = np.array(labels)
    pred = s >= threshold
    out["quality"] = {
        "gradable_images": int(lab.sum()), "degraded_images": int((~lab).sum()),
        "auc": roc_auc(s, lab), "threshold": threshold,
        "sensitivity_gradable": float(pred[lab].mean()),
        "specificity_ungradable": float((~pred[~lab]).mean()),
        "pass_rate_by_kind": {k: float(np.mean(np.array(v) >= threshold))
                              for k, v in per_kind.items()},
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("-v", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.v else logging.WARNING)
    print(json.dumps(measure(args.data, args.seeds), indent=2))


if __name__ == "__main__":
    main()

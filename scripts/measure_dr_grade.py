#!/usr/bin/env python3
"""Measure `dr-grade` and `dme-risk` 1.0.0 the node's way and record the figures.

Each image runs through the real executor on the resolved graph (fundus-quality gate, the
field-of-view crop, resize, the committed ONNX graphs), exactly as `dicomnode evaluate` does.
Figures on the IDRiD test split (103 images, never used to choose anything):
  referable_dr / referable_dme: AUC with a 95 % bootstrap CI, sensitivity and specificity at
    the manifest threshold (95 % Wilson CIs, bootstrap CIs too), confusion matrix;
  dr_grade / dme_risk: quadratic-weighted kappa (arg-max class) with a 95 % bootstrap CI,
    accuracy, per-class one-vs-rest AUC, confusion matrix.
Other cameras (not trained on): the fraction called referable on CHASE_DB1 (Nidek NM-200-D,
children, no DR expected, so that fraction is 1 - specificity) and the outputs on the NEMA
WG04 VL4 fundus. Writes metrics.json and the manifests' `metrics:` in both model folders.

Only 1.0.0 (the compact CNN of scripts/train_dr_grade.py). Later versions are measured by
`dicomnode evaluate MODEL@VERSION --output OUTPUT --json` on the CSVs of
scripts/make_idrid_grading_csv.py (it gives AUC with its CI, sensitivity, specificity, kappa
and per-class AUC; no kappa CI), as scripts/train_dr_features.py's docstring lists.

Usage: .venv/bin/python scripts/measure_dr_grade.py [--data ../shared/data] [--boot 2000]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from train_dr_grade import DME_OUT, DR_OUT, manifest, write_manifest  # noqa: E402

from dicomnode.evaluate.metrics import roc_auc  # noqa: E402
from dicomnode.graph import Selection, resolve  # noqa: E402
from dicomnode.inference.decode import decode_rgb  # noqa: E402
from dicomnode.inference.executor import GraphExecutor  # noqa: E402
from dicomnode.inference.preprocess import SourceImage  # noqa: E402
from dicomnode.inference.sessions import SessionPool  # noqa: E402
from dicomnode.registry import load_registry  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
SEED = 20261201
OUTPUTS = ("dr_grade", "referable_dr", "dme_risk", "referable_dme")


# --------------------------------------------------------------------------- statistics


def quadratic_kappa(predicted: NDArray[np.int64], truth: NDArray[np.int64], k: int) -> float:
    """Cohen's kappa with quadratic weights over classes 0..k-1."""
    observed = np.zeros((k, k))
    np.add.at(observed, (truth, predicted), 1.0)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    denominator = float((weights * expected).sum())
    return math.nan if denominator == 0 else 1.0 - float((weights * observed).sum()) / denominator


def wilson(successes: int, total: int, z: float = 1.959964) -> list[float]:
    if total == 0:
        return [math.nan, math.nan]
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [round(centre - half, 4), round(centre + half, 4)]


def bootstrap(statistic: Any, n: int, boot: int) -> list[float]:
    """Percentile 95 % CI of `statistic(indices)` over `boot` resamples (fixed seed)."""
    rng = np.random.default_rng(SEED)
    values = []
    for _ in range(boot):
        value = statistic(rng.integers(0, n, n))
        if not math.isnan(value):
            values.append(value)
    low, high = np.percentile(values, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def binary_figures(score: NDArray[np.float64], positive: NDArray[np.bool_], threshold: float,
                   boot: int) -> dict[str, Any]:
    called = score >= threshold
    tp, fn = int((called & positive).sum()), int((~called & positive).sum())
    tn, fp = int((~called & ~positive).sum()), int((called & ~positive).sum())

    def sens(idx: NDArray[np.int64]) -> float:
        p = positive[idx]
        return float(called[idx][p].mean()) if p.any() else math.nan

    def spec(idx: NDArray[np.int64]) -> float:
        q = ~positive[idx]
        return float((~called[idx][q]).mean()) if q.any() else math.nan

    return {
        "auc": round(roc_auc(score, positive), 4),
        "auc_ci95": bootstrap(lambda i: roc_auc(score[i], positive[i]), score.size, boot),
        "threshold": threshold,
        "sensitivity": round(tp / (tp + fn), 4), "sensitivity_ci95_wilson": wilson(tp, tp + fn),
        "sensitivity_ci95_bootstrap": bootstrap(sens, score.size, boot),
        "specificity": round(tn / (tn + fp), 4), "specificity_ci95_wilson": wilson(tn, tn + fp),
        "specificity_ci95_bootstrap": bootstrap(spec, score.size, boot),
        "accuracy": round((tp + tn) / score.size, 4),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "positives": tp + fn, "negatives": tn + fp,
    }


def grade_figures(prob: NDArray[np.float64], truth: NDArray[np.int64], labels: Sequence[str],
                  boot: int) -> dict[str, Any]:
    k = len(labels)
    predicted = prob.argmax(1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    return {
        "quadratic_kappa": round(quadratic_kappa(predicted, truth, k), 4),
        "quadratic_kappa_ci95": bootstrap(
            lambda i: quadratic_kappa(predicted[i], truth[i], k), truth.size, boot),
        "accuracy": round(float((predicted == truth).mean()), 4),
        "per_class_auc": {label: round(roc_auc(prob[:, c], truth == c), 4)
                          for c, label in enumerate(labels)},
        "confusion_matrix": confusion.tolist(),
        "confusion_rows_truth_columns_predicted": list(labels),
        "decision": "arg-max class",
    }


# --------------------------------------------------------------------------- running


class Runner:
    def __init__(self, registry_path: Path) -> None:
        self.registry = load_registry(registry_path)
        if self.registry.left_out:
            raise SystemExit(f"registry left models out: {self.registry.left_out}")
        # 1.0.0 pinned: this script writes 1.0.0's folders (train_dr_grade's DR_OUT, DME_OUT);
        # the latest version would otherwise be measured into them.
        self.graph = resolve(Selection.of(["dr-grade@1.0.0", "dme-risk@1.0.0"], modality="OP"),
                             self.registry)
        self.executor = GraphExecutor(self.registry, SessionPool(["CPUExecutionProvider"]),
                                      model_threads=1)
        self.count = 0

    def run(self, rgb: NDArray[np.uint8]) -> dict[str, NDArray[np.float64]] | str:
        """The four outputs of one image, or why the graph skipped it."""
        self.count += 1
        uid = f"2.25.{self.count}"
        result = self.executor.run(self.graph, [SourceImage(uid, rgb)])
        out: dict[str, NDArray[np.float64]] = {}
        for model in ("dr-grade", "dme-risk"):
            mine = result.models[model]
            if mine.status == "failed":
                raise SystemExit(f"{model} failed: {mine.error}")
            if uid in mine.skipped or mine.status == "skipped":
                return mine.skipped.get(uid) or mine.error or "skipped"
            for name, values in mine.raw.items():
                out[name] = np.asarray(values[uid], dtype=np.float64).reshape(-1)
        return out


def read_split(data: Path, split: str) -> list[tuple[Path, int, int]]:
    folder = data / "IDRiD" / "grading"
    with (folder / f"{split}_labels.csv").open(newline="") as handle:
        return [(folder / split / r["image"], int(r["dr_grade"]), int(r["dme_risk"]))
                for r in csv.DictReader(handle)]


def load_rgb(path: Path) -> NDArray[np.uint8]:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def measure_idrid(runner: Runner, data: Path, thresholds: dict[str, float],
                  boot: int) -> dict[str, Any]:
    rows = read_split(data, "test")
    kept, outputs, skipped = [], [], {}
    for path, grade_of, dme_of in rows:
        out = runner.run(load_rgb(path))
        if isinstance(out, str):
            skipped[path.name] = out
            continue
        kept.append((path.name, grade_of, dme_of))
        outputs.append(out)
    grade = np.array([k[1] for k in kept])
    dme = np.array([k[2] for k in kept])
    stack = {name: np.stack([o[name] for o in outputs]) for name in OUTPUTS}
    return {
        "dataset": "IDRiD disease grading, official test split",
        "images": len(kept), "skipped": skipped,
        "referable_dr": binary_figures(stack["referable_dr"][:, 1], grade >= 2,
                                       thresholds["referable_dr"], boot),
        "dr_grade": grade_figures(stack["dr_grade"], grade,
                                  ["none", "mild", "moderate", "severe", "proliferative"], boot),
        "referable_dme": binary_figures(stack["referable_dme"][:, 1], dme >= 1,
                                        thresholds["referable_dme"], boot),
        "dme_risk": grade_figures(stack["dme_risk"], dme, ["0", "1", "2"], boot),
        "per_image": [
            {"image": k[0], "dr_grade": k[1], "dme_risk": k[2],
             "p_referable_dr": round(float(o["referable_dr"][1]), 4),
             "p_referable_dme": round(float(o["referable_dme"][1]), 4),
             "dr_grade_argmax": int(o["dr_grade"].argmax()),
             "dme_risk_argmax": int(o["dme_risk"].argmax())}
            for k, o in zip(kept, outputs, strict=True)],
    }


def measure_other_cameras(runner: Runner, data: Path,
                          thresholds: dict[str, float]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    chase = sorted((data / "CHASE_DB1" / "images").glob("Image_*.jpg"))
    if chase:
        scores: dict[str, list[float]] = {"dr": [], "dme": []}
        skipped = {}
        for path in chase:
            out = runner.run(load_rgb(path))
            if isinstance(out, str):
                skipped[path.name] = out
                continue
            scores["dr"].append(float(out["referable_dr"][1]))
            scores["dme"].append(float(out["referable_dme"][1]))
        dr, dm = np.array(scores["dr"]), np.array(scores["dme"])
        result["CHASE_DB1"] = {
            "dataset": "CHASE_DB1, all 28 images (Nidek NM-200-D, 30 deg, disc-centred, "
                       "children; no DR expected)",
            "images": int(dr.size), "skipped": skipped,
            "fraction_referable_dr": round(float((dr >= thresholds["referable_dr"]).mean()), 4),
            "fraction_referable_dme": round(
                float((dm >= thresholds["referable_dme"]).mean()), 4),
            "p_referable_dr_median": round(float(np.median(dr)), 4),
            "p_referable_dme_median": round(float(np.median(dm)), 4),
        }
    vl4 = data / "dicom-samples" / "NEMA_WG04" / "J2KI" / "VL4_J2KI"
    if vl4.is_file():
        out = runner.run(decode_rgb(pydicom.dcmread(vl4)))
        result["NEMA_VL4"] = out if isinstance(out, str) else {
            "dataset": "NEMA WG04 VL4 fundus (JPEG 2000), DR status unknown",
            **{name: [round(float(v), 4) for v in out[name]] for name in OUTPUTS}}
    return result


def manifest_metrics(idrid: dict[str, Any], other: dict[str, Any], date: str, model: str
                     ) -> list[dict[str, Any]]:
    binary, grades = (("referable_dr", "dr_grade") if model == "dr-grade"
                      else ("referable_dme", "dme_risk"))
    b, g = idrid[binary], idrid[grades]
    figures = {"auc": b["auc"], "auc_ci95_low": b["auc_ci95"][0],
               "auc_ci95_high": b["auc_ci95"][1], "sensitivity": b["sensitivity"],
               "specificity": b["specificity"], "accuracy": b["accuracy"],
               f"{grades}_quadratic_kappa": g["quadratic_kappa"],
               f"{grades}_accuracy": g["accuracy"]}
    metrics = [{
        "dataset": f"IDRiD disease grading test split ({idrid['images']} images)",
        "split": "test", "date": date, "figures": figures,
        "notes": (f"output {binary} at threshold {b['threshold']} (chosen on held-out train "
                  f"images); AUC CI: 2000-sample bootstrap; kappa of {grades} arg-max "
                  f"(CI {g['quadratic_kappa_ci95']}); scripts/measure_dr_grade.py; details "
                  "in metrics.json"),
    }]
    chase = other.get("CHASE_DB1")
    if chase:
        key = "fraction_referable_dr" if model == "dr-grade" else "fraction_referable_dme"
        metrics.append({
            "dataset": "CHASE_DB1 all 28 images (another camera; children, no DR expected)",
            "split": "external", "date": date,
            "figures": {"fraction_called_referable": chase[key],
                        "specificity": round(1 - chase[key], 4)},
            "notes": "specificity assuming no referable disease in this population",
        })
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    parser.add_argument("--registry", type=Path, default=REPO / "model_registry")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)

    training = json.loads((DR_OUT / "metrics.json").read_text())["training"]
    thresholds = training["thresholds"]
    runner = Runner(args.registry)
    idrid = measure_idrid(runner, args.data, thresholds, args.boot)
    other = measure_other_cameras(runner, args.data, thresholds)
    date = datetime.date.today().isoformat()
    for model, out in (("dr-grade", DR_OUT), ("dme-risk", DME_OUT)):
        record = {"model": model, "version": "1.0.0", "date": date, "test": idrid,
                  "other_cameras": other, "training": training}
        (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        write_manifest(out, manifest(model, int(training["size"]), thresholds,
                                     manifest_metrics(idrid, other, date, model)))
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "per_class_auc"}
               for k, v in idrid.items() if k in OUTPUTS}
    print(json.dumps({"test": summary, "other_cameras": other,
                      "skipped": idrid["skipped"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Train `dr-grade` and `dme-risk` (1.1.0, 1.2.0): lesion evidence -> pooled features -> heads.

Referable DR (grade >= 2) and IDRiD's DME risk are defined by lesions: haemorrhages, hard and
soft exudates, and how close the exudates lie to the macula. So each graph is
  lesion-seg (its committed ONNX, unchanged, run on the same 768 px FOV crop)
  -> fixed pooling layers (lesion probability mass and thresholded area overall and in a zone
     around an estimated fovea, blob counts by a max-pool peak test, peak values, a few
     colour/contrast statistics of the crop)
  -> a learned head: a standardised, class-weighted logistic model on those features.
Two forms (--graph):
  composed  (1.1.0) lesion-seg 1.0.0 inside the graph (`onnx.compose`, prefix `lesion/`); one
            input, `image`. A preset running lesion-seg and both models computed the maps 3 times.
  upstream  (1.2.0, the default) only the pooling and heads; inputs `image` and the three maps,
            which the manifest takes `from: lesion-seg.<map>`: the node runs lesion-seg once and
            feeds its raw output (the 768 px model-space probabilities) to both models.
1.2.0 was made by `cut` from 1.1.0 (the same nodes and weights, no refit; checked equal).

Heads (fitted on the IDRiD grading **train** split only, class-weighted, L2):
  referable_dr   binary logistic on grade >= 2
  dr_grade       multinomial logistic on the 5 grades
  referable_dme  binary logistic on risk >= 1
  dme_risk       multinomial logistic on the 3 risks
The operating thresholds come from stratified 5-fold cross-validation on the train split: the
out-of-fold scores of the train images, and the highest threshold (2 decimals, rounded down)
that gives sensitivity >= 0.90 on them. Nothing is chosen on the test split; `measure` runs it
once, at the end.

Leakage: lesion-seg was trained on the IDRiD *segmentation* train images. `leakage` compares
those with the grading images (downsampled grey thumbnails) and reports any that are the same
photograph; the card says what was found.

Every step takes --lesion-version V (default: the latest lesion-seg in model_registry; its
manifest gives the ONNX, input side and mask thresholds the features use) and --version OUT
(default 1.2.0; the dr-grade / dme-risk folders written). Caches live outside the repository,
in /tmp/dicomnode-dr-features (lesion-seg 1.0.0) or /tmp/dicomnode-dr-features/lesion-seg-V.

Refit the heads on another lesion-seg V as version OUT (e.g. V=1.1.0, OUT=1.3.0):
  S="--lesion-version $V --version $OUT"
  .venv/bin/python scripts/train_dr_features.py leakage $S
  .venv/bin/python scripts/train_dr_features.py cache $S   # lesion-seg on 516 images (slow)
  .venv/bin/python scripts/train_dr_features.py cv $S      # 5-fold CV on train; 1.0.0 compared
  .venv/bin/python scripts/train_dr_features.py export $S  # fit on all train, upstream ONNX,
                                                           # thresholds, metrics.json
  .venv/bin/python scripts/train_dr_features.py measure $S # the test split, once (cached maps)
  .venv/bin/python scripts/train_dr_features.py other-camera $S   # CHASE_DB1
  .venv/bin/python scripts/make_idrid_grading_csv.py /tmp/idrid-csv --split test
  for o in referable_dr dr_grade; do .venv/bin/dicomnode evaluate dr-grade@$OUT --output $o \
      --json --dataset /tmp/idrid-csv/test_$o.csv > WORK/eval_dr-grade-${OUT}_$o.json; done
  (and dme-risk with referable_dme, dme_risk; WORK is the cache folder above)
  .venv/bin/python scripts/train_dr_features.py manifests $S   # manifests from those results
  then write CARD.md, and bump the presets' figures if they moved.
1.1.0 itself: the same sequence with --lesion-version 1.0.0 --version 1.1.0 --graph composed
(its evaluate results were saved as WORK/eval_<model>_<output>.json).
1.2.0: `cut --lesion-version 1.0.0 --version 1.2.0` (from 1.1.0), the evaluate runs,
`manifests --lesion-version 1.0.0 --version 1.2.0`.

torch and onnx are needed by this script only, never by the dicomnode package.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The heads are tiny: a threaded BLAS only spins against the other jobs on a shared CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from numpy.typing import NDArray
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomnode.inference.fov import crop_square, find_field_of_view, square_box  # noqa: E402
from dicomnode.inference.preprocess import resize_rgb  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "IDRiD"
REGISTRY = REPO / "model_registry"
BASE_WORK = Path("/tmp/dicomnode-dr-features")
SEED = 20261202
# Set by `configure` from --lesion-version / --version / --graph (defaults: the latest
# lesion-seg in the registry, 1.2.0, upstream); the values below are 1.1.0's.
LESION_VERSION = "1.0.0"
LESION_ONNX = REGISTRY / "lesion-seg" / LESION_VERSION / "model.onnx"
VERSION = "1.1.0"
GRAPH = "composed"  # "composed": lesion-seg inside the graph; "upstream": fed by the node
DR_OUT = REGISTRY / "dr-grade" / VERSION
DME_OUT = REGISTRY / "dme-risk" / VERSION
WORK = BASE_WORK  # lesion-seg 1.0.0's caches; another lesion-seg gets WORK/lesion-seg-<v>
SIZE = 768  # lesion-seg's input side; the node crops the FOV square and resizes to it
POOL = 4  # lesion maps are pooled 4x4 (to 192) before any feature: cheap, and cacheable
LESIONS = ("haemorrhages", "hard_exudates", "soft_exudates")
TARGET_SENSITIVITY = 0.90
SAME_PHOTOGRAPH = 0.95  # high-passed thumbnails: same photograph >= 0.995, others <= 0.92


# --------------------------------------------------------------------------- data


def read_labels(path: Path) -> list[tuple[str, int, int]]:
    with path.open(newline="") as handle:
        return [(r["image"], int(r["dr_grade"]), int(r["dme_risk"]))
                for r in csv.DictReader(handle)]


def node_crop(rgb: NDArray[np.uint8], size: int | None = None) -> NDArray[np.uint8]:
    """The node's geometry: FOV square crop, resized to S x S (uint8 RGB)."""
    side = size or SIZE
    box = square_box(find_field_of_view(rgb).box)
    crop = np.ascontiguousarray(crop_square(rgb, box), dtype=np.uint8)
    return resize_rgb(crop, side, side)


def to_tensor(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    out: NDArray[np.float32] = np.ascontiguousarray(
        (images.astype(np.float32) / 255.0).transpose(0, 3, 1, 2))
    return out



# --------------------------------------------------------------------------- configuration


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def latest_version(model_id: str) -> str:
    found = [p.name for p in (REGISTRY / model_id).iterdir() if (p / "manifest.yaml").exists()]
    return max(found, key=version_key)


def configure(args: argparse.Namespace) -> None:
    """Point the module at one lesion-seg version and one output version.

    The lesion-seg manifest gives its ONNX, its input side and its mask thresholds (the
    features threshold the maps there), so another lesion-seg plugs in by --lesion-version; its
    caches go to their own folder. 1.1.0 was built on lesion-seg 1.0.0 (composed graph)."""
    import yaml

    global LESION_VERSION, LESION_ONNX, LESION_THRESHOLDS, SIZE, VERSION, GRAPH
    global DR_OUT, DME_OUT, WORK
    LESION_VERSION = args.lesion_version or latest_version("lesion-seg")
    folder = REGISTRY / "lesion-seg" / LESION_VERSION
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    LESION_ONNX = folder / manifest.get("file", "model.onnx")
    masks = {o["name"]: o for o in manifest["outputs"] if o.get("kind") == "mask"}
    missing = [name for name in LESIONS if name not in masks]
    if missing:
        raise SystemExit(f"lesion-seg {LESION_VERSION} has no mask output {missing}")
    LESION_THRESHOLDS = tuple(float(masks[name]["threshold"]) for name in LESIONS)
    image = next(i for i in manifest["inputs"] if "from" not in i)
    if image["size"][0] != image["size"][1] or image["size"][0] % POOL:
        raise SystemExit(f"lesion-seg {LESION_VERSION}: input {image['size']} is not a square "
                         f"multiple of {POOL}")
    SIZE = int(image["size"][0])
    VERSION, GRAPH = args.version, args.graph
    DR_OUT = REGISTRY / "dr-grade" / VERSION
    DME_OUT = REGISTRY / "dme-risk" / VERSION
    WORK = BASE_WORK if LESION_VERSION == "1.0.0" else BASE_WORK / f"lesion-seg-{LESION_VERSION}"
    print(f"lesion-seg {LESION_VERSION} ({LESION_ONNX.relative_to(REPO)}, {SIZE} px, thresholds "
          f"{LESION_THRESHOLDS}) -> {VERSION} ({GRAPH} graph); caches in {WORK}", flush=True)


# --------------------------------------------------------------------------- leakage


def thumbnail(path: Path) -> NDArray[np.float32]:
    """A 144x96 high-passed grey thumbnail of the whole frame (vessels, lesions), unit norm.

    The high-pass removes what every fundus shares (the bright disc, the dark rim), so two
    different eyes correlate weakly and the same photograph at another scale near 1."""
    from PIL import ImageFilter

    small = Image.open(path).convert("L").resize((144, 96), Image.Resampling.BOX)
    grey = np.asarray(small, dtype=np.float32)
    low = np.asarray(small.filter(ImageFilter.GaussianBlur(4)), dtype=np.float32)
    grey = grey - low
    grey = grey - grey.mean()
    out: NDArray[np.float32] = grey / np.float32(np.linalg.norm(grey) + 1e-6)
    return out


def leakage(args: argparse.Namespace) -> None:
    seg = sorted((DATA / "segmentation" / "train" / "images").glob("*.jpg"))
    seg_test = sorted((DATA / "segmentation" / "test" / "images").glob("*.jpg"))
    report: dict[str, Any] = {}
    for gsplit in ("train", "test"):
        grading = sorted((DATA / "grading" / gsplit).glob("*.jpg"))
        g = np.stack([thumbnail(p) for p in grading]).reshape(len(grading), -1)
        for sname, sfiles in (("seg_train", seg), ("seg_test", seg_test)):
            s = np.stack([thumbnail(p) for p in sfiles]).reshape(len(sfiles), -1)
            corr = s @ g.T  # correlation of normalised thumbnails
            best = corr.argmax(1)
            pairs = [(sfiles[i].name, grading[best[i]].name, round(float(corr[i, best[i]]), 4))
                     for i in range(len(sfiles))]
            same = [p for p in pairs if p[2] > SAME_PHOTOGRAPH]
            report[f"{sname}_vs_grading_{gsplit}"] = {
                "compared": [len(sfiles), len(grading)],
                f"same_photograph (corr > {SAME_PHOTOGRAPH})": same,
                "best_correlations_quantiles": np.quantile(
                    [p[2] for p in pairs], [0, 0.5, 0.9, 1]).round(4).tolist(),
            }
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "leakage.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


# --------------------------------------------------------------------------- lesion cache


def cache(args: argparse.Namespace) -> None:
    """Run lesion-seg (ONNX Runtime) on every grading image; keep the 4x4-pooled maps."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(LESION_ONNX), options,
                                   providers=["CPUExecutionProvider"])
    WORK.mkdir(parents=True, exist_ok=True)
    for split in args.split or ("train", "test"):
        rows = read_labels(DATA / "grading" / f"{split}_labels.csv")
        if args.limit:
            rows = rows[: args.limit]
        out = WORK / f"lesions_{split}.npz"
        if out.exists() and not args.limit:
            with np.load(out) as z:
                if len(z["names"]) == len(rows):
                    continue
        part = WORK / f"lesions_{split}.partial"
        part.mkdir(exist_ok=True)
        start = time.time()
        for k, (name, _, _) in enumerate(rows):
            target = part / (name + ".npz")
            if target.exists():
                continue
            rgb = node_crop(np.asarray(Image.open(DATA / "grading" / split / name)
                                       .convert("RGB")))
            maps = session.run(list(LESIONS), {"image": to_tensor(rgb[None])})
            prob = np.concatenate(maps, axis=1)[0]  # (3, S, S)
            c, s = prob.shape[0], SIZE // POOL
            blocks = prob.reshape(c, s, POOL, s, POOL)
            img = rgb.astype(np.float32).reshape(s, POOL, s, POOL, 3).mean((1, 3))
            np.savez(target, avg=blocks.mean((2, 4)).astype(np.float32),
                     max=blocks.max((2, 4)).astype(np.float32),
                     rgb=img.transpose(2, 0, 1).astype(np.float32) / 255.0)
            if k % 20 == 0:
                print(f"{split} {k + 1}/{len(rows)} {time.time() - start:.0f}s", flush=True)
        if args.limit:
            continue
        parts = [np.load(part / (r[0] + ".npz")) for r in rows]
        np.savez(out, avg=np.stack([p["avg"] for p in parts]),
                 max=np.stack([p["max"] for p in parts]),
                 rgb=np.stack([p["rgb"] for p in parts]),
                 grade=np.array([r[1] for r in rows]), dme=np.array([r[2] for r in rows]),
                 names=np.array([r[0] for r in rows]))
        print(f"{split}: {len(rows)} images cached in {time.time() - start:.0f}s "
              f"(lesion-seg {LESION_VERSION})", flush=True)


# --------------------------------------------------------------------------- features

LESION_THRESHOLDS = (0.75, 0.62, 0.89)  # lesion-seg's mask thresholds (`configure` reads them)
# Disc diameter in units of the FOV radius: a 50-degree field and a ~6-degree disc (IDRiD's
# Kowa VX-10a) give DD ~ 0.12 of the FOV diameter, i.e. 0.24 in [-1, 1] coordinates.
DISC_DIAMETER = 0.24
FOVEA_OFFSET_MAX = 0.4  # the fovea is looked for within this of the crop centre


def feature_names() -> list[str]:
    names: list[str] = []
    zones = ("fov", "fovea1dd", "fovea2dd", "centre")
    for lesion in LESIONS:
        for zone in zones:
            names += [f"{lesion}_mass_{zone}", f"{lesion}_area_{zone}"]
        names += [f"{lesion}_peak", f"{lesion}_top", f"{lesion}_blobs", f"{lesion}_blobs_low",
                  f"{lesion}_blobs_fovea2dd"]
    names += ["red_mean", "green_mean", "blue_mean", "green_std", "green_detail",
              "fovea_distance_from_centre"]
    return names


def build_features() -> Any:
    """Fixed layers: 4x4-pooled lesion maps and crop -> one row of features per image.

    In the exported graph its inputs are pooled from lesion-seg's outputs and the input image
    by the wrapper (`PooledFeatures`); `cv` feeds it the cached pooled maps, so training and the
    node see the same numbers."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    s = SIZE // POOL

    class Features(nn.Module):
        yy: torch.Tensor
        xx: torch.Tensor
        thr: torch.Tensor
        central: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            axis = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
            yy, xx = torch.meshgrid(axis, axis, indexing="ij")
            self.register_buffer("yy", yy[None, None])
            self.register_buffer("xx", xx[None, None])
            self.register_buffer("thr", torch.tensor(LESION_THRESHOLDS)[None, :, None, None])
            central = ((xx.abs() < FOVEA_OFFSET_MAX) & (yy.abs() < FOVEA_OFFSET_MAX)).float()
            self.register_buffer("central", central[None, None])

        def forward(self, avg: torch.Tensor, mx: torch.Tensor, rgb: torch.Tensor
                    ) -> torch.Tensor:
            n = avg.shape[0]
            red = rgb[:, 0:1]
            rmax = red.amax(dim=(2, 3), keepdim=True)
            fov = (red > torch.clamp(rmax * 0.12, min=12 / 255)).float()
            npx = fov.sum(dim=(2, 3)) + 1.0  # (N, 1)
            # Fovea: the darkest point of the heavily smoothed green within the central window
            # (macula-centred photographs; a large smoothing ignores vessels and small lesions).
            green = rgb[:, 1:2]
            gs = F.avg_pool2d(green * fov, 15, 1, 7) / (F.avg_pool2d(fov, 15, 1, 7) + 1e-3)
            gs = gs + (1.0 - self.central * fov) * 10.0
            hit = (gs <= gs.amin(dim=(2, 3), keepdim=True)).float()
            count = hit.sum(dim=(2, 3), keepdim=True)
            fy = (hit * self.yy).sum(dim=(2, 3), keepdim=True) / count
            fx = (hit * self.xx).sum(dim=(2, 3), keepdim=True) / count
            dist = torch.sqrt((self.yy - fy) ** 2 + (self.xx - fx) ** 2)
            radius = torch.sqrt(self.yy ** 2 + self.xx ** 2)
            zones = torch.cat([fov, fov * (dist < DISC_DIAMETER).float(),
                               fov * (dist < 2 * DISC_DIAMETER).float(),
                               fov * (radius < 0.3).float()], dim=1)  # (N, 4, s, s)
            area = (mx > self.thr).float()
            mass_z = (avg[:, :, None] * zones[:, None]).sum(dim=(3, 4)) / npx[:, :, None]
            area_z = (area[:, :, None] * zones[:, None]).sum(dim=(3, 4)) / npx[:, :, None]
            zoned = torch.log(torch.stack([mass_z, area_z], dim=3) + 1e-4)  # (N, 3, 4, 2)
            peak = mx.amax(dim=(2, 3))
            top = F.avg_pool2d(avg, 5, 1, 2).amax(dim=(2, 3))
            local = F.max_pool2d(mx, 5, 1, 2)
            is_peak = (mx >= local).float()
            blobs = (is_peak * area).sum(dim=(2, 3))
            blobs_low = (is_peak * (mx > 0.5).float()).sum(dim=(2, 3))
            blobs_f2 = (is_peak * area * zones[:, 2:3]).sum(dim=(2, 3))
            per_lesion = torch.cat([
                zoned.reshape(n, 3, 8), peak[:, :, None], top[:, :, None],
                torch.log1p(blobs)[:, :, None], torch.log1p(blobs_low)[:, :, None],
                torch.log1p(blobs_f2)[:, :, None]], dim=2).reshape(n, -1)
            mean = (rgb * fov).sum(dim=(2, 3)) / npx
            gm = mean[:, 1:2]
            gstd = torch.sqrt(((green - gm[:, :, None, None]) ** 2 * fov).sum(dim=(2, 3)) / npx)
            detail = ((green - F.avg_pool2d(green, 5, 1, 2)).abs() * fov).sum(dim=(2, 3)) / npx
            fdist = torch.sqrt(fy ** 2 + fx ** 2).reshape(n, 1)
            return torch.cat([per_lesion, mean, gstd / (gm + 1e-3), detail / (gm + 1e-3),
                              fdist], dim=1)

    return Features()


def load_cache(split: str) -> dict[str, Any]:
    with np.load(WORK / f"lesions_{split}.npz") as z:
        return {k: z[k] for k in z.files}


def compute_features(split: str) -> tuple[NDArray[np.float64], dict[str, Any]]:
    import torch

    data = load_cache(split)
    feats = build_features().eval()
    rows = []
    with torch.no_grad():
        for i in range(0, len(data["names"]), 32):
            sl = slice(i, i + 32)
            rows.append(feats(torch.from_numpy(data["avg"][sl]), torch.from_numpy(data["max"][sl]),
                              torch.from_numpy(data["rgb"][sl])).double().numpy())
    return np.concatenate(rows), data


# --------------------------------------------------------------------------- heads
#
# Each model is three logistic heads on the same features, so that the referable probability
# is exactly the sum of the grades it stands for (the node's SR never contradicts itself):
#   p = P(referable)                     binary, class-balanced (the screening decision)
#   P(grade | referable), P(grade | not) multinomial, fitted on those images only
#   grade probabilities = [(1 - p) * P(. | not), p * P(. | referable)]
# DME has no "lower" head (risk 0 is the only non-referable grade).

MODELS = {  # model: (label key, first referable grade, classes, output names)
    "dr-grade": ("grade", 2, 5, ("dr_grade", "referable_dr")),
    "dme-risk": ("dme", 1, 3, ("dme_risk", "referable_dme")),
}
L2_GRID = (3e-3, 1e-2, 3e-2)
Head = tuple[NDArray[np.float64], NDArray[np.float64]]


def fit_logistic(x: NDArray[np.float64], y: NDArray[np.int64], classes: int, l2: float,
                 balanced: bool = True) -> Head:
    """L2 softmax regression on standardised x, optionally class-balanced, by damped Newton
    steps (numpy: the problem is tiny, and exact convergence keeps it reproducible).

    Loss: weighted mean cross-entropy + l2 * |W|^2 (the bias is not penalised). Returns (W, b)
    for raw x: the standardisation is folded in. Two classes are a softmax with two logits,
    the same graph as more."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], axis=1)  # bias column last
    d = xs.shape[1]
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    cw = (np.where(counts > 0, counts.sum() / (classes * np.maximum(counts, 1)), 0.0)
          if balanced else np.ones(classes))
    sw = cw[y] / cw[y].sum()  # per-sample weight of the weighted mean
    onehot = np.eye(classes)[y]
    ridge = np.full(d, 2 * l2)
    ridge[-1] = 1e-6  # the bias: only enough to fix softmax's shift freedom

    def loss(theta: NDArray[np.float64]) -> float:
        z = xs @ theta
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(-(sw * (onehot * logp).sum(1)).sum() + 0.5 * (ridge[:, None]
                                                                   * theta ** 2).sum())

    theta = np.zeros((d, classes))
    current = loss(theta)
    for _ in range(100):
        prob = softmax(xs @ theta)
        grad = xs.T @ ((prob - onehot) * sw[:, None]) + ridge[:, None] * theta
        # Hessian (d*classes)^2: sum_i sw_i (diag p_i - p_i p_i^T) (x) x_i x_i^T
        if np.abs(grad).max() < 1e-9:
            break
        a = (prob[:, :, None] * np.eye(classes)[None] - prob[:, :, None] * prob[:, None, :])
        a *= sw[:, None, None]
        blocks = np.zeros((d, classes, d, classes))
        for k in range(classes):
            for m in range(classes):
                blocks[:, k, :, m] = xs.T @ (xs * a[:, k, m][:, None])
        hess = blocks.reshape(d * classes, d * classes) + np.diag(np.repeat(ridge, classes))
        step = np.linalg.solve(hess, grad.reshape(-1)).reshape(d, classes)
        t = 1.0
        while t > 1e-4:
            trial = theta - t * step
            value = loss(trial)
            if value <= current:
                break
            t /= 2
        else:
            break
        done = current - value < 1e-12
        theta, current = trial, value
        if done:
            break
    w = theta[:-1] / sd[:, None]
    bias = theta[-1] - (mu[:, None] * w).sum(0)
    return w, bias


def softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    out: NDArray[np.float64] = e / e.sum(1, keepdims=True)
    return out


def fit_model(model: str, x: NDArray[np.float64], data: dict[str, Any], l2: float,
              balanced_grades: bool) -> dict[str, Head]:
    key, first, classes, _ = MODELS[model]
    grade = np.asarray(data[key], dtype=np.int64)
    pos = grade >= first
    heads = {"referable": fit_logistic(x, pos.astype(np.int64), 2, l2)}
    heads["upper"] = fit_logistic(x[pos], grade[pos] - first, classes - first, l2,
                                  balanced_grades)
    if first > 1:
        heads["lower"] = fit_logistic(x[~pos], grade[~pos], first, l2, balanced_grades)
    return heads


def predict_model(heads: dict[str, Head], x: NDArray[np.float64]
                  ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(grade probabilities (N, classes), P(referable) (N,)), as the graph computes them."""
    p = softmax(x @ heads["referable"][0] + heads["referable"][1])[:, 1]
    upper = softmax(x @ heads["upper"][0] + heads["upper"][1]) * p[:, None]
    lower = (softmax(x @ heads["lower"][0] + heads["lower"][1]) if "lower" in heads
             else np.ones((len(x), 1))) * (1 - p)[:, None]
    return np.concatenate([lower, upper], axis=1), p


def folds(strata: NDArray[np.int64], k: int, seed: int) -> list[NDArray[np.int64]]:
    """Stratified k folds (indices), fixed by seed."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(k)]
    dealt = 0  # deal each stratum on from where the last one stopped: folds stay balanced
    for key in np.unique(strata):
        members = np.flatnonzero(strata == key)
        rng.shuffle(members)
        for m in members:
            out[dealt % k].append(int(m))
            dealt += 1
    return [np.array(sorted(f)) for f in out]


def out_of_fold(model: str, x: NDArray[np.float64], data: dict[str, Any], l2: float,
                balanced_grades: bool, draw: int, k: int = 5
                ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Out-of-fold (grade probabilities, P(referable)) of every train image, one fold draw."""
    strata = np.asarray(data["grade"]) * 3 + np.asarray(data["dme"])
    classes = MODELS[model][2]
    prob, ref = np.zeros((len(x), classes)), np.zeros(len(x))
    for held in folds(strata, k, SEED + draw):
        fit = np.setdiff1d(np.arange(len(x)), held)
        sub = {key: np.asarray(v)[fit] for key, v in data.items() if key in ("grade", "dme")}
        prob[held], ref[held] = predict_model(
            fit_model(model, x[fit], sub, l2, balanced_grades), x[held])
    return prob, ref


def sensitivity_threshold(scores: NDArray[np.float64], positive: NDArray[np.bool_],
                          target: float) -> float:
    """The highest threshold (2 decimals, rounded down) with sensitivity >= target."""
    pos = np.sort(scores[positive])
    keep = math.ceil(target * pos.size - 1e-9)
    cut = pos[pos.size - keep]
    return float(math.floor(cut * 100) / 100)


DRAWS = 3


def cv_model(model: str, x: NDArray[np.float64], data: dict[str, Any]) -> dict[str, Any]:
    """Per (L2, grade weighting): CV AUC of P(referable) and kappa of the arg-max grade, both
    pooled over DRAWS different 5-fold draws; the choice; the threshold from the choice."""
    from dicomnode.evaluate.metrics import quadratic_weighted_kappa, roc_auc

    key, first, classes, _ = MODELS[model]
    grade = np.asarray(data[key], dtype=np.int64)
    pos = np.tile(grade >= first, DRAWS)
    truth = np.tile(grade, DRAWS)
    rows: dict[str, Any] = {}
    scores: dict[str, NDArray[np.float64]] = {}
    for l2 in L2_GRID:
        for balanced in (True, False):
            runs = [out_of_fold(model, x, data, l2, balanced, d) for d in range(DRAWS)]
            prob = np.concatenate([r[0] for r in runs])
            ref = np.concatenate([r[1] for r in runs])
            name = f"l2={l2} grades={'balanced' if balanced else 'unweighted'}"
            rows[name] = {
                "l2": l2, "balanced_grades": balanced,
                "auc": round(roc_auc(ref, pos), 4),
                "kappa": round(quadratic_weighted_kappa(prob.argmax(1), truth, classes), 4),
            }
            scores[name] = ref
    # Referable AUC first (the screening decision), kappa breaks near-ties (within 0.005).
    best_auc = max(r["auc"] for r in rows.values())
    name = max((n for n, r in rows.items() if r["auc"] >= best_auc - 0.005),
               key=lambda n: rows[n]["kappa"])
    ref = scores[name]
    t = sensitivity_threshold(ref, pos, TARGET_SENSITIVITY)
    return {"grid": rows, "chosen": name, "l2": rows[name]["l2"],
            "balanced_grades": rows[name]["balanced_grades"],
            "cv_auc": rows[name]["auc"], "cv_kappa": rows[name]["kappa"], "threshold": t,
            "cv_sensitivity": round(float((ref[pos] >= t).mean()), 4),
            "cv_specificity": round(float((ref[~pos] < t).mean()), 4),
            "cv_positives": int((grade >= first).sum()),
            "cv_negatives": int((grade < first).sum())}


def old_holdout(data: dict[str, Any]) -> NDArray[np.int64]:
    """The 83 train images 1.0.0 held out (its script's rule), to compare on the same images."""
    sys.path.insert(0, str(REPO / "scripts"))
    from train_dr_grade import holdout_split

    idx: NDArray[np.int64] = holdout_split(np.asarray(data["grade"]),
                                           np.asarray(data["dme"]), 0.2)[1]
    return idx


def lesion_seg_seen(split: str) -> list[str]:
    """Grading images of `split` that are lesion-seg's segmentation-training photographs."""
    leak = json.loads((WORK / "leakage.json").read_text())
    pairs = leak[f"seg_train_vs_grading_{split}"][f"same_photograph (corr > {SAME_PHOTOGRAPH})"]
    return sorted({p[1] for p in pairs})


def cv_all(x: NDArray[np.float64], data: dict[str, Any]) -> dict[str, Any]:
    from dicomnode.evaluate.metrics import roc_auc

    held = old_holdout(data)
    seen = lesion_seg_seen("train")
    report = {}
    for model in MODELS:
        entry = cv_model(model, x, data)
        key, first = MODELS[model][0], MODELS[model][1]
        pos = np.asarray(data[key]) >= first
        _, ref = out_of_fold(model, x, data, entry["l2"], entry["balanced_grades"], 0)
        entry["cv_auc_on_1_0_0_held_out_83"] = round(roc_auc(ref[held], pos[held]), 4)
        # lesion-seg was trained on some of these photographs: its maps of them are better
        # than of unseen ones, which would flatter CV. The same scores without them:
        unseen = ~np.isin(np.asarray(data["names"]).astype(str), seen)
        entry["cv_auc_without_lesion_seg_training_images"] = round(
            roc_auc(ref[unseen], pos[unseen]), 4)
        entry["cv_images_without_lesion_seg_training_images"] = int(unseen.sum())
        report[model] = entry
    return report


def cv(args: argparse.Namespace) -> None:
    start = time.time()
    x, data = compute_features("train")
    print(f"features {x.shape} in {time.time() - start:.0f}s", flush=True)
    report = cv_all(x, data)
    for entry in report.values():
        entry["grid"] = {k: (v["auc"], v["kappa"]) for k, v in entry["grid"].items()}
    print(json.dumps(report, indent=2), flush=True)


# --------------------------------------------------------------------------- export


def build_graph(model: str, heads: dict[str, Head]) -> tuple[Any, tuple[str, str]]:
    """The part of the 1.1.0 graph after lesion-seg: (image, 3 lesion maps) -> 2 outputs."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    names = MODELS[model][3]

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = build_features()
            self.parts = list(heads)
            for part, (w, b) in heads.items():
                self.register_buffer(f"{part}_w", torch.tensor(w, dtype=torch.float32))
                self.register_buffer(f"{part}_b", torch.tensor(b, dtype=torch.float32))

        def head(self, part: str, f: torch.Tensor) -> torch.Tensor:
            w, b = getattr(self, f"{part}_w"), getattr(self, f"{part}_b")
            return torch.softmax(f @ w + b, dim=1)

        def forward(self, image: torch.Tensor, haemorrhages: torch.Tensor,
                    hard_exudates: torch.Tensor, soft_exudates: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            maps = torch.cat([haemorrhages, hard_exudates, soft_exudates], dim=1)
            f = self.features(F.avg_pool2d(maps, POOL), F.max_pool2d(maps, POOL),
                              F.avg_pool2d(image, POOL))
            p = self.head("referable", f)[:, 1:2]
            upper = self.head("upper", f) * p
            lower = self.head("lower", f) * (1 - p) if "lower" in self.parts else 1 - p
            return torch.cat([lower, upper], dim=1), torch.cat([1 - p, p], dim=1)

    return Graph().eval(), names


def compose_onnx(head: Any, names: tuple[str, str], path: Path, doc: str) -> None:
    """lesion-seg 1.0.0's committed graph -> `head`, one ONNX file with one input `image`."""
    import onnx
    import onnx.compose
    import torch
    from onnx import helper

    lesion = onnx.load(str(LESION_ONNX))
    # lesion-seg's graph hands its input on, so the head sees the same image.
    lesion.graph.node.append(helper.make_node("Identity", ["image"], ["image_passthrough"]))
    lesion.graph.output.append(helper.make_tensor_value_info(
        "image_passthrough", onnx.TensorProto.FLOAT, ["batch", 3, SIZE, SIZE]))
    lesion = onnx.compose.add_prefix(lesion, "lesion/", rename_inputs=False,
                                     rename_outputs=False)
    tmp = path.parent / "head.tmp.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    maps = [torch.zeros(1, 1, SIZE, SIZE) for _ in LESIONS]
    inputs = ["head_image", *(f"head_{n}" for n in LESIONS)]
    torch.onnx.export(
        head, (torch.zeros(1, 3, SIZE, SIZE), *maps), str(tmp), opset_version=17,
        input_names=inputs, output_names=list(names),
        dynamic_axes={k: {0: "batch"} for k in [*inputs, *names]}, dynamo=False)
    head_model = onnx.load(str(tmp))
    tmp.unlink()
    head_model = onnx.compose.add_prefix(head_model, "head/", rename_inputs=False,
                                         rename_outputs=False)
    merged = onnx.compose.merge_models(
        lesion, head_model,
        io_map=[("image_passthrough", "head_image"), *((n, f"head_{n}") for n in LESIONS)],
        outputs=list(names), doc_string=doc)
    onnx.checker.check_model(merged, full_check=True)
    onnx.save(merged, str(path))


def export_upstream(head: Any, names: tuple[str, str], path: Path, doc: str) -> None:
    """`head` alone, one ONNX file with inputs `image` and the three lesion maps: the node
    feeds the maps from the lesion-seg it runs anyway (`from: lesion-seg.<map>`)."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    maps = [torch.zeros(1, 1, SIZE, SIZE) for _ in LESIONS]
    inputs = ["image", *LESIONS]
    torch.onnx.export(
        head, (torch.zeros(1, 3, SIZE, SIZE), *maps), str(path), opset_version=17,
        input_names=inputs, output_names=list(names),
        dynamic_axes={k: {0: "batch"} for k in [*inputs, *names]}, dynamo=False)
    model = onnx.load(str(path))
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def cut_upstream(composed: Path, path: Path, doc: str) -> None:
    """A composed graph (lesion-seg inside, prefix `lesion/`) with the lesion part cut out:
    the same head nodes and weights, the lesion maps and the image as graph inputs."""
    import onnx
    from onnx import helper

    model = onnx.load(str(composed))
    graph = model.graph
    lesion_outputs = set(LESIONS) | {"image_passthrough"}
    nodes = [n for n in graph.node if not n.name.startswith("lesion/")
             and not set(n.output) & lesion_outputs]
    for node in nodes:  # the head read lesion-seg's copy of the image: read the input itself
        for i, name in enumerate(node.input):
            if name == "image_passthrough":
                node.input[i] = "image"
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in graph.initializer if t.name in used]
    inputs = [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                            ["batch", 3, SIZE, SIZE])]
    inputs += [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                             ["batch", 1, SIZE, SIZE]) for name in LESIONS]
    missing = used - {i.name for i in inputs} - {t.name for t in initializers} \
        - {o for n in nodes for o in n.output} - {""}
    if missing:
        raise SystemExit(f"{composed}: the head reads {sorted(missing)} from the lesion part")
    cut = helper.make_graph(nodes, graph.name, inputs, list(graph.output), initializers)
    out = helper.make_model(cut, opset_imports=list(model.opset_import), doc_string=doc,
                            ir_version=model.ir_version, producer_name=model.producer_name)
    onnx.checker.check_model(out, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(out, str(path))


class GraphRunner:
    """Runs a dr-grade / dme-risk graph as the node does: composed (image only), or upstream
    (lesion-seg first, its raw maps and the same image tensor into the head)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.upstream = len(self.session.get_inputs()) > 1
        self.lesion = (ort.InferenceSession(str(LESION_ONNX), providers=["CPUExecutionProvider"])
                       if self.upstream else None)

    def run(self, rgb: NDArray[np.uint8]) -> list[NDArray[np.float32]]:
        feeds = {"image": to_tensor(rgb[None])}
        if self.lesion is not None:
            maps = self.lesion.run(list(LESIONS), feeds)
            feeds.update(zip(LESIONS, maps, strict=True))
        return [np.asarray(v) for v in self.session.run(None, feeds)]


def check_composed(path: Path, split: str, count: int,
                   expected: Sequence[NDArray[np.float64]]) -> float:
    """Run the graph on the first `count` images of `split` (raw JPEG -> node crop)
    and return the largest difference from the cached-feature pipeline's probabilities."""
    runner = GraphRunner(path)
    rows = read_labels(DATA / "grading" / f"{split}_labels.csv")[:count]
    worst = 0.0
    for i, (name, _, _) in enumerate(rows):
        rgb = node_crop(np.asarray(Image.open(DATA / "grading" / split / name).convert("RGB")))
        got = runner.run(rgb)
        for out, want in zip(got, expected, strict=True):
            worst = max(worst, float(np.abs(out[0] - want[i]).max()))
    return worst


def check_same(first: Path, second: Path, count: int = 3) -> float:
    """Largest output difference between two graphs (either form) on the first `count`
    grading-train images and a synthetic fundus."""
    from dicomnode.synthetic import synthetic_fundus

    a, b = GraphRunner(first), GraphRunner(second)
    rows = read_labels(DATA / "grading" / "train_labels.csv")[:count]
    images = [np.asarray(Image.open(DATA / "grading" / "train" / r[0]).convert("RGB"))
              for r in rows]
    images.append(synthetic_fundus(1024, "R", 3))
    worst = 0.0
    for rgb in images:
        crop = node_crop(rgb)
        for x, y in zip(a.run(crop), b.run(crop), strict=True):
            worst = max(worst, float(np.abs(x - y).max()))
    return worst


def doc_line(model: str, names: tuple[str, str]) -> str:
    if GRAPH == "upstream":
        return (f"{model} {VERSION}: RGB [0,1] NCHW {SIZE}x{SIZE} FOV crop + lesion-seg "
                f"{LESION_VERSION}'s maps (graph inputs, from the node's lesion-seg) -> pooled "
                f"lesion features -> logistic heads -> {names[0]}, {names[1]}")
    return (f"{model} {VERSION}: RGB [0,1] NCHW {SIZE}x{SIZE} FOV crop -> lesion-seg "
            f"{LESION_VERSION} -> pooled lesion features -> logistic heads -> "
            f"{names[0]}, {names[1]}")


def cut(args: argparse.Namespace) -> None:
    """--version's upstream graphs cut from --source's composed ones (same heads, same
    weights, no refit), checked against them; metrics.json carries the source's record."""
    if GRAPH != "upstream":
        raise SystemExit("cut writes upstream graphs (--graph upstream)")
    for model, out in (("dr-grade", DR_OUT), ("dme-risk", DME_OUT)):
        source = REGISTRY / model / args.source
        names = MODELS[model][3]
        cut_upstream(source / "model.onnx", out / "model.onnx", doc_line(model, names))
        diff = check_same(source / "model.onnx", out / "model.onnx")
        if diff > 1e-4:
            raise SystemExit(f"{model}: {VERSION} differs from {args.source} by {diff}")
        record = json.loads((source / "metrics.json").read_text())
        record["training"]["graph"] = {
            "form": "upstream", "cut_from": f"{model} {args.source}",
            "lesion_seg": LESION_VERSION,
            "max_difference_vs_source": diff,
            "checked_on": "3 IDRiD grading-train images and a synthetic fundus",
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{model}: {out / 'model.onnx'} cut from {args.source} "
              f"(max difference {diff:.2g})", flush=True)


def export(args: argparse.Namespace) -> None:
    import torch

    x, data = compute_features("train")
    report = cv_all(x, data)
    print(json.dumps({m: {k: v for k, v in e.items() if k != "grid"}
                      for m, e in report.items()}, indent=2), flush=True)
    leak = WORK / "leakage.json"
    for model, out in (("dr-grade", DR_OUT), ("dme-risk", DME_OUT)):
        entry = report[model]
        heads = fit_model(model, x, data, entry["l2"], entry["balanced_grades"])
        arrays: dict[str, Any] = {f"{part}_{i}": v for part, wb in heads.items()
                                  for i, v in enumerate(wb)}
        np.savez(WORK / f"heads_{model}.npz", **arrays)
        graph, names = build_graph(model, heads)
        if GRAPH == "upstream":
            export_upstream(graph, names, out / "model.onnx", doc_line(model, names))
        else:
            compose_onnx(graph, names, out / "model.onnx", doc_line(model, names))
        prob, p = predict_model(heads, x[:3])
        diff = check_composed(out / "model.onnx", "train", 3,
                              [prob, np.stack([1 - p, p], axis=1)])
        if diff > 2e-3:
            raise SystemExit(f"{model}: composed ONNX differs from the cached pipeline by {diff}")
        training = {
            "seed": SEED, "torch": torch.__version__, "size": SIZE,
            "graph": {"form": GRAPH, "lesion_seg": LESION_VERSION,
                      "lesion_thresholds": list(LESION_THRESHOLDS)},
            "train_images": len(x), "features": feature_names(),
            "cv_scheme": f"stratified (grade x DME risk) 5-fold, {DRAWS} draws, out-of-fold "
                         "scores pooled; L2 and grade weighting chosen on CV referable AUC "
                         "(kappa within 0.005)",
            "cv": entry,
            "threshold_rule": f"highest threshold (2 decimals) with sensitivity >= "
                              f"{TARGET_SENSITIVITY} on the pooled out-of-fold scores",
            "onnx_vs_cached_max_difference": diff,
            "leakage": json.loads(leak.read_text()) if leak.exists() else None,
        }
        (out / "metrics.json").write_text(json.dumps({"training": training}, indent=2) + "\n")
        print(f"{model}: {out / 'model.onnx'} (max difference {diff:.2g})", flush=True)


# --------------------------------------------------------------------------- measure

GATED = ("IDRiD_023.jpg",)  # fundus-quality 2.0.0 (latest) stops this one (dicomnode evaluate)


def load_heads(model: str) -> dict[str, Head]:
    with np.load(WORK / f"heads_{model}.npz") as z:
        parts = sorted({k.rsplit("_", 1)[0] for k in z.files})
        return {p: (z[f"{p}_0"], z[f"{p}_1"]) for p in parts}


def figures(prob: NDArray[np.float64], ref: NDArray[np.float64], grade: NDArray[np.int64],
            first: int, threshold: float, boot: int = 2000) -> dict[str, Any]:
    from dicomnode.evaluate.metrics import quadratic_weighted_kappa, roc_auc

    pos = grade >= first
    called = ref >= threshold
    rng = np.random.default_rng(SEED)
    aucs, kappas = [], []
    for _ in range(boot):
        i = rng.integers(0, len(ref), len(ref))
        if pos[i].all() or not pos[i].any():
            continue
        aucs.append(roc_auc(ref[i], pos[i]))
        kappas.append(quadratic_weighted_kappa(prob[i].argmax(1), grade[i], prob.shape[1]))
    return {
        "images": len(ref), "positives": int(pos.sum()), "negatives": int((~pos).sum()),
        "auc": round(roc_auc(ref, pos), 4),
        "auc_ci": np.quantile(aucs, [0.025, 0.975]).round(4).tolist(),
        "threshold": threshold,
        "sensitivity": round(float(called[pos].mean()), 4),
        "specificity": round(float((~called[~pos]).mean()), 4),
        "confusion": [[int((~called & ~pos).sum()), int((called & ~pos).sum())],
                      [int((~called & pos).sum()), int((called & pos).sum())]],
        "kappa": round(quadratic_weighted_kappa(prob.argmax(1), grade, prob.shape[1]), 4),
        "kappa_ci": np.quantile(kappas, [0.025, 0.975]).round(4).tolist(),
        "grade_accuracy": round(float((prob.argmax(1) == grade).mean()), 4),
    }


def measure(args: argparse.Namespace) -> None:
    """The test split, once, from the cached lesion maps (the same numbers as the composed
    graph: `export` checked that); all gradable images, and without the images lesion-seg was
    trained on (leakage.json)."""
    x, data = compute_features("test")
    names = [str(n) for n in data["names"]]
    leaked = lesion_seg_seen("test")
    gradable = np.array([n not in GATED for n in names])
    clean = gradable & np.array([n not in leaked for n in names])
    report: dict[str, Any] = {"gated": list(GATED), "lesion_seg_training_images": leaked}
    for model, (key, first, _, _) in MODELS.items():
        out = DR_OUT if model == "dr-grade" else DME_OUT
        threshold = json.loads((out / "metrics.json").read_text())["training"]["cv"]["threshold"]
        prob, ref = predict_model(load_heads(model), x)
        grade = np.asarray(data[key], dtype=np.int64)
        report[model] = {
            "gradable": figures(prob[gradable], ref[gradable], grade[gradable], first, threshold),
            "gradable_without_lesion_seg_training_images": figures(
                prob[clean], ref[clean], grade[clean], first, threshold),
        }
    (WORK / "test_figures.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def other_camera(args: argparse.Namespace) -> None:
    """CHASE_DB1 (Nidek NM-200-D, 30 degrees, disc-centred, children: no DR expected): the
    fraction of images each graph calls referable (1 - specificity if none has it)."""
    images = sorted((REPO.parent / "shared" / "data" / "CHASE_DB1" / "images").glob("*.jpg"))
    report: dict[str, Any] = {"dataset": "CHASE_DB1", "images": len(images)}
    crops = [node_crop(np.asarray(Image.open(p).convert("RGB"))) for p in images]
    for model, out in (("dr-grade", DR_OUT), ("dme-risk", DME_OUT)):
        runner = GraphRunner(out / "model.onnx")
        threshold = json.loads((out / "metrics.json").read_text())["training"]["cv"]["threshold"]
        p = np.array([runner.run(c)[1][0, 1] for c in crops])
        report[model] = {"threshold": threshold,
                         "fraction_called_referable": round(float((p >= threshold).mean()), 4),
                         "median_p_referable": round(float(np.median(p)), 4)}
    (WORK / f"other_camera_{VERSION}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


# --------------------------------------------------------------------------- manifests

ATTRIBUTION = (
    "IDRiD (Indian Diabetic Retinopathy Image Dataset), CC BY 4.0: Prasanna Porwal, Samiksha "
    "Pachade, Ravi Kamble, Manesh Kokare, Girish Deshmukh, Vivek Sahasrabuddhe, Fabrice "
    "Meriaudeau; Porwal et al., Data 3(3):25, 2018, doi 10.21227/H25W98"
)
EVALUATIONS = {  # model: outputs measured with `dicomnode evaluate --json`
    "dr-grade": ("referable_dr", "dr_grade"),
    "dme-risk": ("referable_dme", "dme_risk"),
}
LAST_CLASS = {"dr-grade": "proliferative", "dme-risk": "risk 2"}


def evaluation_path(model: str, output: str) -> Path:
    """Where the sequence in the docstring puts `dicomnode evaluate --json`'s result (1.1.0's
    were saved without the version)."""
    if VERSION == "1.1.0":
        return WORK / f"eval_{model}_{output}.json"
    return WORK / f"eval_{model}-{VERSION}_{output}.json"


def evaluation_metrics(model: str) -> list[dict[str, Any]]:
    """The manifest's `metrics`: one entry per `dicomnode evaluate --json` result kept."""
    out = []
    for output in EVALUATIONS[model]:
        path = evaluation_path(model, output)
        if not path.exists():
            continue
        ev = json.loads(path.read_text())
        keep = ("auc", "auc_ci", "sensitivity", "specificity", "accuracy", "kappa")
        figures = {k: (round(ev[k], 4) if isinstance(ev[k], float)
                       else [round(v, 4) for v in ev[k]])
                   for k in keep if k in ev and ev[k] is not None}
        for label, value in (ev.get("auc_per_class") or {}).items():
            figures[f"auc_per_class.{label}"] = round(value, 4)
        if ev.get("threshold") is not None:
            how = (f"threshold {ev['threshold']}, chosen by cross-validation on the train "
                   "split; `kappa` is the two-class kappa")
        else:
            how = (f"the most probable grade; `kappa` is the quadratic-weighted kappa of the "
                   f"grade, `auc`, `sensitivity`, `specificity` are {LAST_CLASS[model]} against "
                   "the rest, `auc_per_class` one class against the rest")
        stopped = len(ev.get("skipped", {}))
        gated = f"{stopped} image{'' if stopped == 1 else 's'}"
        out.append({
            "dataset": f"IDRiD disease grading test split ({ev['images']} gradable images), "
                       f"output {output}",
            "split": "test", "date": time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime)),
            "figures": figures,
            "notes": f"dicomnode evaluate {model}@{VERSION} --output {output} --json ({how}; "
                     f"{gated} stopped by fundus-quality); AUC CI: "
                     "bootstrap over images; see CARD.md",
        })
    return out


def image_input() -> dict[str, Any]:
    """The 768 px FOV-crop input, as lesion-seg declares it (so the node shares the tensor)."""
    import yaml

    lesion = yaml.safe_load((REGISTRY / "lesion-seg" / LESION_VERSION / "manifest.yaml")
                            .read_text())
    spec = dict(next(i for i in lesion["inputs"] if "from" not in i))
    return {"name": "image", **{k: v for k, v in spec.items() if k != "name"}}


def manifests(args: argparse.Namespace) -> None:
    import yaml

    for model, out in (("dr-grade", DR_OUT), ("dme-risk", DME_OUT)):
        old = yaml.safe_load((REGISTRY / model / "1.0.0" / "manifest.yaml").read_text())
        entry = json.loads((out / "metrics.json").read_text())["training"]["cv"]
        kind = "DR" if model == "dr-grade" else "DME"
        old["version"] = VERSION
        title = ("Diabetic retinopathy grade and referable DR" if kind == "DR"
                 else "Diabetic macular edema risk and referable DME")
        old["name"] = f"{title} (lesion evidence + logistic heads, IDRiD)"
        where = ("run once as its own node of the graph; its raw maps are this model's inputs"
                 if GRAPH == "upstream" else "inside the graph")
        old["description"] = (
            f"Lesion-seg ({where}) finds haemorrhages, hard and soft exudates (the heads were "
            f"fitted on lesion-seg {LESION_VERSION}'s maps); their area, count and distance "
            f"from an estimated fovea feed "
            f"logistic heads trained on the IDRiD grading train split. Referable {kind} "
            f"(grade >= {MODELS[model][1]}) at a threshold chosen by cross-validation on the "
            f"train split for sensitivity >= 0.90 (CV AUC {entry['cv_auc']:.2f}). Research use; "
            "not clinically validated.")
        old["requirements"] = {"colour": "colour", "min_width": 512, "min_height": 512}
        old["inputs"][0]["size"] = [SIZE, SIZE]
        if GRAPH == "upstream":
            # fitted_on: the resolver refuses a graph whose lesion-seg is another version.
            old["inputs"] = [image_input(), *({"name": name, "from": f"lesion-seg.{name}",
                                                "dtype": "float32",
                                                "fitted_on": {"lesion-seg": LESION_VERSION}}
                                               for name in LESIONS)]
        for o in old["outputs"]:
            if o["name"].startswith("referable"):
                o["threshold"] = entry["threshold"]
        old["provenance"]["training_data"] = (
            f"{ATTRIBUTION}. Official grading train split (413 images), all fitted; "
            f"thresholds and L2 from stratified 5-fold cross-validation on it "
            f"({DRAWS} draws); lesion evidence from lesion-seg {LESION_VERSION} (IDRiD "
            "segmentation train split); trained by scripts/train_dr_features.py (fixed seed). "
            "Test split (103) for figures only; some of its photographs were lesion-seg "
            "training images (see CARD.md)")
        old["metrics"] = evaluation_metrics(model)
        record = json.loads((out / "metrics.json").read_text())
        other = WORK / f"other_camera_{VERSION}.json"
        if VERSION == "1.1.0" and not other.exists():
            other = WORK / "other_camera.json"
        for key, path in (("test", WORK / "test_figures.json"), ("other_camera", other)):
            if path.exists():
                found = json.loads(path.read_text())
                record[key] = found.get(model, found) if key == "test" else found
        (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        if other.exists():
            seen = json.loads(other.read_text())
            called = seen[model]["fraction_called_referable"]
            old["metrics"].append({
                "dataset": f"CHASE_DB1 all {seen['images']} images (another camera; children, "
                           "no DR expected)",
                "split": "external",
                "date": time.strftime("%Y-%m-%d", time.gmtime(other.stat().st_mtime)),
                "figures": {"fraction_called_referable": called,
                            "specificity": round(1 - called, 4)},
                "notes": "specificity assuming no referable disease in this population; "
                         f"scripts/train_dr_features.py other-camera --version {VERSION} "
                         "(the committed graph)",
            })
        header = (f"# manifest: model_registry/{model}/{VERSION}/manifest.yaml (built by "
                  "scripts/train_dr_features.py manifests; figures from dicomnode evaluate)\n")
        text = yaml.safe_dump(old, sort_keys=False, width=100, allow_unicode=False)
        (out / "manifest.yaml").write_text(header + text)
        print(f"{out / 'manifest.yaml'}: {len(old['metrics'])} evaluations", flush=True)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["leakage", "cache", "cv", "export", "cut",
                                            "measure", "other-camera", "manifests"])
    parser.add_argument("--lesion-version", default=None,
                        help="the lesion-seg whose maps the heads are fitted on (default: the "
                             "latest in model_registry/lesion-seg); its caches are its own")
    parser.add_argument("--version", default="1.2.0",
                        help="the dr-grade / dme-risk version written or measured "
                             "(default 1.2.0)")
    parser.add_argument("--graph", choices=["upstream", "composed"], default="upstream",
                        help="upstream (default): the heads take lesion-seg's maps as inputs "
                             "(from: lesion-seg.<map>); composed: lesion-seg inside (1.1.0)")
    parser.add_argument("--source", default="1.1.0",
                        help="cut: the composed version whose heads are kept (default 1.1.0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", action="append", choices=["train", "test"],
                        help="cache: only this split (repeatable; default both)")
    parser.add_argument("--limit", type=int, default=0, help="cache: first N images (timing)")
    args = parser.parse_args(argv)
    configure(args)
    {"leakage": leakage, "cache": cache, "cv": cv, "export": export, "cut": cut,
     "measure": measure, "manifests": manifests,
     "other-camera": other_camera}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

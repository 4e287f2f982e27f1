#!/usr/bin/env python3
"""Train the IDRiD segmentation reference models: `optic-disc` 2.0.0 and `lesion-seg` 1.0.0.

    --task disc     the IDRiD optic-disc masks (all 54 training images), 256 px input; the
                    graph also derives the disc centre and equivalent diameter from its own
                    mask, robustly (only the disc-sized region round the strongest response).
    --task lesions  the IDRiD lesion masks (haemorrhages HE, hard exudates EX, soft exudates
                    SE, microaneurysms MA), 768 px input. Trained on 44 training images; the
                    other 10 (IDRiD_05, 10, ... 50) are held out to choose each output's
                    threshold and whether the microaneurysm output is good enough to ship.

Both are a fixed filter bank (first layers of the graph) and a learned per-pixel network
trained on sampled pixels of augmented training images: on the shared 2-core CPU a U-Net
step took 17-40 s, far too slow to train in the time a run may take.

PyTorch on CPU, fixed seeds, deterministic algorithms; a checkpoint after every epoch (one
pass over the sampled pixels) in --checkpoints (outside the repository); ONNX export
(opset 17, dynamic batch) into --out; then the EXPORTED graph is measured on the IDRiD
segmentation test split (27 images) the way the node runs it. Figures go to metrics.json next
to the model and are printed as JSON.

Pre-processing contract (shared with the node's executor, see dicomnode/inference/fov.py):
  node:  find_field_of_view -> square_box -> crop_square -> resize_image(S) -> RGB/255 NCHW
  graph: field-of-view mask from the red channel; contrast normalisation within the field of
         view (disc: per-image mean/std of each colour; lesions: local mean/std, Gaussian
         sigma S/32), multi-scale filter bank, all fixed first layers -> per-pixel network
         (1x1 convolutions) -> sigmoid (x FOV mask) [disc: -> robust disc selection]
  node:  resize_probability(box size) -> place_back(source frame) -> threshold

Figures (test, at source resolution 1429x949, pixels inside the field of view that
find_field_of_view finds): AUPR = average precision (the IDRiD challenge's lesion metric),
pooled over all pixels of all test images, with scores binned at 1e-4 (ties within a bin
count as one threshold); Dice / sensitivity / precision at the operating threshold, pooled;
95 % bootstrap intervals resample test images (2000 draws, fixed seed).

torch is needed by this script only, never by the dicomnode package.

Usage: .venv/bin/python scripts/train_idrid_seg.py --task disc|lesions [--data ../shared/data/IDRiD]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomnode.inference.fov import (  # noqa: E402
    Box,
    crop_square,
    find_field_of_view,
    place_back,
    resize_image,
    resize_probability,
    square_box,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "IDRiD"
SEED = 20261201
BINS = 10000  # score histogram resolution for AUPR / threshold search
LESIONS = ("HE", "EX", "SE", "MA")
LESION_NAMES = {"HE": "haemorrhages", "EX": "hard_exudates", "SE": "soft_exudates",
                "MA": "microaneurysms"}
HELD_OUT = [f"IDRiD_{n:02d}" for n in range(5, 55, 5)]  # lesions: threshold images
TEST_LIMIT: int | None = None  # --smoke only


@dataclass(frozen=True)
class TaskSpec:
    size: int
    codes: tuple[str, ...]  # mask folders, one network output channel each
    version: str
    model_id: str


TASKS = {
    "disc": TaskSpec(256, ("OD",), "2.0.0", "optic-disc"),
    "lesions": TaskSpec(768, LESIONS, "1.0.0", "lesion-seg"),
}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Case:
    name: str
    rgb: NDArray[np.uint8]  # (H, W, 3) source image
    masks: dict[str, NDArray[np.bool_]]  # code -> (H, W); all-false where IDRiD has no file


def case_names(data: Path, split: str) -> list[str]:
    names = sorted(p.stem for p in (data / "segmentation" / split / "images").glob("*.jpg"))
    return names[:TEST_LIMIT] if split == "test" and TEST_LIMIT else names


def load_case(data: Path, split: str, name: str, codes: Sequence[str]) -> Case:
    root = data / "segmentation" / split
    rgb = np.asarray(Image.open(root / "images" / f"{name}.jpg").convert("RGB"))
    masks: dict[str, NDArray[np.bool_]] = {}
    for code in codes:
        path = root / code / f"{name}_{code}.png"
        if path.is_file():
            mask = np.asarray(Image.open(path).convert("L")) > 0
            if mask.shape != rgb.shape[:2]:
                raise ValueError(f"{path}: {mask.shape} vs image {rgb.shape}")
        else:  # IDRiD ships no mask where the image has none of that lesion
            mask = np.zeros(rgb.shape[:2], dtype=bool)
        masks[code] = mask
    return Case(name, rgb, masks)


def node_input(rgb: NDArray[np.uint8], size: int) -> tuple[NDArray[np.float32], Box]:
    """The node's pre-processing: (1, 3, S, S) float32 in [0, 1] and the square box."""
    box = square_box(find_field_of_view(rgb).box)
    small = resize_image(crop_square(rgb, box), size)  # type: ignore[arg-type]
    x = (small.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(x), box


def node_output(prob: NDArray[np.float32], box: Box, shape: tuple[int, int]) -> NDArray[np.float32]:
    """The node's post-processing of a mask: back to the box size, then into the source frame."""
    resized = resize_probability(prob, box.height, box.width)
    return place_back(resized, box, shape).astype(np.float32)


def soft_truth(truth: NDArray[np.bool_], box: Box, size: int) -> NDArray[np.float32]:
    """Lesion fraction of each S x S pixel (area-averaged): the training target."""
    crop = crop_square(truth.astype(np.float32), box)
    pil = Image.fromarray(crop, mode="F").resize((size, size), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


# --------------------------------------------------------------------------- figures


def histograms(score: NDArray[np.float32], label: NDArray[np.bool_]) -> NDArray[np.int64]:
    """(2, BINS + 1) counts of negative / positive pixels per score bin floor(score * BINS)."""
    index = np.clip((score.astype(np.float64) * BINS).astype(np.int64), 0, BINS)
    neg = np.bincount(index[~label], minlength=BINS + 1)
    pos = np.bincount(index[label], minlength=BINS + 1)
    return np.stack([neg, pos]).astype(np.int64)


def average_precision(hist: NDArray[np.int64]) -> NDArray[np.float64]:
    """AP of (..., 2, BINS + 1) histograms: sum over thresholds (high to low) of the recall
    step times the precision there. NaN without positives."""
    neg = hist[..., 0, ::-1].astype(np.float64)
    pos = hist[..., 1, ::-1].astype(np.float64)
    tp = np.cumsum(pos, axis=-1)
    fp = np.cumsum(neg, axis=-1)
    total = tp[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        ap = np.sum(pos * precision, axis=-1) / total[..., 0]
    return np.asarray(ap)


def roc_auc_hist(hist: NDArray[np.int64]) -> float:
    neg = hist[0].astype(np.float64)
    pos = hist[1].astype(np.float64)
    below = np.cumsum(neg) - neg
    return float((np.sum(pos * below) + 0.5 * np.sum(pos * neg)) / (pos.sum() * neg.sum()))


def dice_from(tp: NDArray[np.float64] | np.float64, fp: NDArray[np.float64] | np.float64,
              fn: NDArray[np.float64] | np.float64) -> NDArray[np.float64]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(2 * tp / (2 * tp + fp + fn))


def choose_threshold(hist: NDArray[np.int64]) -> tuple[float, float]:
    """Threshold in 0.01..0.99 that maximises pooled Dice on `hist`, and that Dice."""
    grid = np.arange(1, 100)
    neg_ge = np.cumsum(hist[0, ::-1])[::-1]  # pixels with bin >= k
    pos_ge = np.cumsum(hist[1, ::-1])[::-1]
    cut = grid * (BINS // 100)
    tp = pos_ge[cut].astype(np.float64)
    fp = neg_ge[cut].astype(np.float64)
    fn = hist[1].sum() - tp
    dices = dice_from(tp, fp, fn)
    best = int(np.nanargmax(dices))
    return float(grid[best] / 100), float(dices[best])


def bootstrap(n: int, draws: int = 2000) -> NDArray[np.float64]:
    """(draws, n) multiplicities of images in resamples with replacement (fixed seed)."""
    rng = np.random.default_rng(SEED)
    picks = rng.integers(0, n, size=(draws, n))
    weights = np.zeros((draws, n))
    for j in range(n):
        weights[:, j] = (picks == j).sum(axis=1)
    return weights


def interval(values: NDArray[np.float64]) -> list[float]:
    finite = values[np.isfinite(values)]
    low, high = np.percentile(finite, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


# --------------------------------------------------------------------------- model


def build_modules(task: str) -> tuple[Any, Any]:
    """(Features, PixelNet) torch modules for a task.

    Features: fixed first layers (FOV mask, contrast normalisation, a multi-scale filter bank);
    PixelNet: the learned part, a per-pixel network (1x1 convolutions) on those features.
    The 2 CPU cores this was trained on (shared) could not train a U-Net of useful size in
    the time available; a pixel network on a rich fixed filter bank trains in minutes.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    spec = TASKS[task]
    size = spec.size
    unit = 1.0  # filter scales below are in pixels of the model input

    def fov_mask(rgb: torch.Tensor, erode: int) -> torch.Tensor:
        """The field of view as fov.py finds it (red above 12 % of its peak), eroded."""
        red = rgb[:, 0:1]
        peak = torch.amax(red, dim=(2, 3), keepdim=True)
        level = torch.clamp(peak * 0.12, min=12.0 / 255.0)
        mask = (red > level).to(rgb.dtype)
        k = 2 * erode + 1
        return -F.max_pool2d(-mask, k, stride=1, padding=erode)

    def kernel(sigma: float) -> torch.Tensor:
        half = max(1, math.ceil(2.5 * sigma))
        t = torch.arange(-half, half + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        return g / g.sum()

    class Features(nn.Module):
        """Normalised colour (disc: per-image FOV mean/std of each channel; lesions: local
        mean/std in a Gaussian neighbourhood of sigma S/32, so lesions stand out against the
        local background whatever the illumination), then per pixel: the 3 normalised
        channels; their Gaussian smoothings; Hessian eigenvalues (blob / line detectors,
        scale-normalised) and gradient magnitude of green and red at several scales; bright
        and dark top-hats of green (max / min filters); local std of green; distance-to-rim
        (blurred FOV mask). Returns (features (N, F, S, S), FOV mask (N, 1, S, S))."""

        def __init__(self) -> None:
            super().__init__()
            self.local = task != "disc"
            if task == "disc":
                self.sigmas = [2.0, 4.0, 8.0, 16.0]
                self.hessian = [3.0, 6.0, 12.0]
                self.pools = [9, 25]
            else:
                self.sigmas = [1.0, 2.0, 4.0, 8.0]
                self.hessian = [1.0, 2.0, 4.0]
                self.pools = [7, 15]
            self.sigmas = [s * unit for s in self.sigmas]
            self.hessian = [s * unit for s in self.hessian]
            self.pools = [int(p * unit) // 2 * 2 + 1 for p in self.pools]
            self.norm_sigma = size / 32.0 / 4  # local statistics at S/4
            self.erode = max(1, round(size / 256))
            for i, s in enumerate(sorted(set(self.sigmas + self.hessian
                                             + [self.norm_sigma, 4.0 * unit, 12.0 * unit]))):
                self.register_buffer(f"g{i}", kernel(s))
            self.index = {s: i for i, s in enumerate(sorted(set(
                self.sigmas + self.hessian + [self.norm_sigma, 4.0 * unit, 12.0 * unit])))}

        def gauss(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
            """Separable Gaussian of every channel (channels folded into the batch, so the
            kernel's shape is fixed whatever the batch size)."""
            g = getattr(self, f"g{self.index[sigma]}")
            channels, height, width = x.shape[1], x.shape[2], x.shape[3]
            half = (g.shape[0] - 1) // 2
            flat = x.reshape(-1, 1, height, width)
            flat = F.conv2d(flat, g.view(1, 1, 1, -1), padding=(0, half))
            flat = F.conv2d(flat, g.view(1, 1, -1, 1), padding=(half, 0))
            return flat.reshape(-1, channels, height, width)

        def normalise(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            if not self.local:
                area = mask.sum(dim=(2, 3), keepdim=True) + 1.0
                mean = (rgb * mask).sum(dim=(2, 3), keepdim=True) / area
                var = (((rgb - mean) * mask) ** 2).sum(dim=(2, 3), keepdim=True) / area
                return torch.clamp((rgb - mean) / torch.sqrt(var + 0.02**2), -6.0, 6.0) * mask
            stack = torch.cat([rgb * mask, rgb * rgb * mask, mask], dim=1)
            small = F.avg_pool2d(stack, 4)
            smooth = F.interpolate(self.gauss(small, self.norm_sigma), size=rgb.shape[-2:],
                                   mode="bilinear", align_corners=False)
            weight = smooth[:, 6:7] + 1e-4
            mean = smooth[:, 0:3] / weight
            var = torch.clamp(smooth[:, 3:6] / weight - mean * mean, min=0.0)
            return torch.clamp((rgb - mean) / torch.sqrt(var + 0.015**2), -6.0, 6.0) * mask

        def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mask = fov_mask(rgb, self.erode)
            norm = self.normalise(rgb, mask)
            feats = [norm]
            for s in self.sigmas:
                feats.append(self.gauss(norm, s))
            green, red = norm[:, 1:2], norm[:, 0:1]
            both = torch.cat([green, red], dim=1)
            dxx_k = torch.tensor([1.0, -2.0, 1.0]).view(1, 1, 1, 3).repeat(2, 1, 1, 1)
            dyy_k = dxx_k.view(2, 1, 3, 1)
            dxy_k = (torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]]) / 4
                     ).view(1, 1, 3, 3).repeat(2, 1, 1, 1)
            dx_k = (torch.tensor([-0.5, 0.0, 0.5])).view(1, 1, 1, 3).repeat(2, 1, 1, 1)
            dy_k = dx_k.view(2, 1, 3, 1)
            for s in self.hessian:
                sm = self.gauss(both, s)
                dxx = F.conv2d(sm, dxx_k, padding=(0, 1), groups=2)
                dyy = F.conv2d(sm, dyy_k, padding=(1, 0), groups=2)
                dxy = F.conv2d(sm, dxy_k, padding=1, groups=2)
                half_trace = (dxx + dyy) / 2
                root = torch.sqrt(((dxx - dyy) / 2) ** 2 + dxy**2 + 1e-8)
                feats += [(half_trace + root) * s * s, (half_trace - root) * s * s]
                gx = F.conv2d(sm, dx_k, padding=(0, 1), groups=2)
                gy = F.conv2d(sm, dy_k, padding=(1, 0), groups=2)
                feats.append(torch.sqrt(gx**2 + gy**2 + 1e-8) * s)
            for p in self.pools:
                high = F.max_pool2d(green, p, stride=1, padding=p // 2)
                low = -F.max_pool2d(-green, p, stride=1, padding=p // 2)
                feats += [high - green, green - low]
            s4 = 4.0 * unit
            mean4 = self.gauss(green, s4)
            feats.append(torch.sqrt(torch.clamp(self.gauss(green * green, s4) - mean4**2,
                                                min=0.0) + 1e-6))
            feats.append(self.gauss(mask, 12.0 * unit))
            return torch.cat(feats, dim=1) * mask, mask

    class PixelNet(nn.Module):
        """Per-pixel network: fixed standardisation of the features, then 2 hidden layers."""

        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self, features: int, outputs: int) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(features))
            self.register_buffer("std", torch.ones(features))
            self.layers = nn.Sequential(nn.Linear(features, 64), nn.ReLU(),
                                        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, outputs))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """(B, F) -> (B, K) logits."""
            result: torch.Tensor = self.layers((x - self.mean) / self.std)
            return result

        def image(self, feats: torch.Tensor) -> torch.Tensor:
            """(N, F, H, W) -> (N, K, H, W) logits."""
            return self.forward(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    features = Features()
    with torch.no_grad():
        count = features(torch.zeros(1, 3, 64, 64) + 0.5)[0].shape[1]
    return features, PixelNet(count, len(spec.codes))


def exported_module(task: str, pre: Any, net: Any, shift: float = 0.0) -> Any:
    """The graph the node runs. `shift` (disc) moves the logits so that the threshold chosen
    on the training images becomes 0.5, the threshold the centre/diameter and disc-metrics use."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    size = TASKS[task].size

    class Lesions(nn.Module):
        def __init__(self, outputs: int) -> None:
            super().__init__()
            self.pre, self.net, self.outputs = pre, net, outputs

        def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            feats, mask = self.pre(rgb)
            prob = self.net.image(feats).sigmoid() * mask
            return tuple(prob[:, i:i + 1] for i in range(self.outputs))

    class Disc(nn.Module):
        """Mask, centre and diameter, robust to a second bright blob (exudates, atrophy, a
        reflex): the disc is the disc-sized neighbourhood (radius 0.12 of the crop, about
        twice a disc radius) of the strongest disc-sized response (the probability averaged
        over a 31-px square); everything outside it is zeroed in the mask too. The centre is
        the centroid and the diameter 2 sqrt(area / pi) of that mask at 0.5 (the mask
        disc-metrics measures); with no pixel at 0.5 the centre falls back to the seed."""

        yy: torch.Tensor
        xx: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.pre, self.net, self.shift = pre, net, shift
            grid = torch.arange(size, dtype=torch.float32)
            self.register_buffer("yy", grid.view(1, 1, size, 1).expand(1, 1, size, size).clone())
            self.register_buffer("xx", grid.view(1, 1, 1, size).expand(1, 1, size, size).clone())
            self.radius = 0.12 * size

        def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            feats, mask = self.pre(rgb)
            prob = (self.net.image(feats) - self.shift).sigmoid() * mask
            smooth = F.avg_pool2d(prob, 31, stride=1, padding=15, count_include_pad=True)
            flat = smooth.flatten(1)
            index = torch.argmax(flat, dim=1, keepdim=True).to(torch.float32)  # (N, 1)
            seed_y = torch.floor(index / size).view(-1, 1, 1, 1)
            seed_x = index.view(-1, 1, 1, 1) - seed_y * size
            window = (((self.yy - seed_y) ** 2 + (self.xx - seed_x) ** 2)
                      <= self.radius**2).to(prob.dtype)
            disc = prob * window
            binary = (disc >= 0.5).to(prob.dtype)
            area = binary.sum(dim=(1, 2, 3))  # (N,)
            safe = torch.clamp(area, min=1.0)
            cy = torch.where(area > 0, (binary * self.yy).sum(dim=(1, 2, 3)) / safe,
                             seed_y.view(-1))
            cx = torch.where(area > 0, (binary * self.xx).sum(dim=(1, 2, 3)) / safe,
                             seed_x.view(-1))
            centre = torch.stack([(cx + 0.5) / size, (cy + 0.5) / size], dim=1)
            diameter = (2.0 * torch.sqrt(area / math.pi)).view(-1, 1)
            return disc, centre, diameter

    module = Disc() if task == "disc" else Lesions(len(TASKS[task].codes))
    return module.eval()


def output_names(task: str, codes: Sequence[str]) -> list[str]:
    if task == "disc":
        return ["disc_probability", "disc_centre", "disc_diameter"]
    return [LESION_NAMES[c] for c in codes]


def export_onnx(task: str, module: Any, path: Path, codes: Sequence[str]) -> None:
    import onnx
    import torch

    size = TASKS[task].size
    path.parent.mkdir(parents=True, exist_ok=True)
    names = output_names(task, codes)
    torch.onnx.export(
        module, (torch.zeros(1, 3, size, size),), str(path), opset_version=17,
        input_names=["image"], output_names=names,
        dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
        dynamo=False,
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    spec = TASKS[task]
    model.doc_string = (f"{spec.model_id} {spec.version}: RGB [0,1] NCHW {size}x{size} -> "
                        + ", ".join(names))
    onnx.save(model, str(path))


# --------------------------------------------------------------------------- training


def augment(rgb: Any, target: Any, gen: Any, blobs: bool) -> tuple[Any, Any]:
    """Random rotation, flip, scale, shift; colour / brightness / contrast / gamma jitter;
    blur or resolution loss; noise; for the disc, sometimes bright yellow blobs that are NOT
    disc (exudate-like distractors). Batch of whole S x S images (N,3,S,S) and targets."""
    import torch
    from torch.nn import functional as F

    n, _, s, _ = rgb.shape

    def uni(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    angle = uni(-math.pi, math.pi, n)
    scale = torch.exp(uni(math.log(0.85), math.log(1.18), n))
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, :, 2] = uni(-0.06, 0.06, n, 2)
    grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)
    rgb = F.grid_sample(rgb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    target = F.grid_sample(target, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    if blobs:
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32),
                                torch.arange(s, dtype=torch.float32), indexing="ij")
        for i in range(n):
            if float(torch.rand(1, generator=gen)) < 0.4:
                for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
                    cy, cx = float(uni(0.2, 0.8, 1)) * s, float(uni(0.2, 0.8, 1)) * s
                    if float(target[i, 0, int(cy), int(cx)]) > 0:
                        continue
                    r = float(uni(0.01, 0.05, 1)) * s
                    spot = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
                    spot = spot * (1 - target[i, 0]).clamp(0, 1)
                    colour = torch.tensor([0.35, 0.3, 0.05]).view(3, 1, 1) * float(uni(0.5, 1.2, 1))
                    lit = (rgb[i, 0:1] > 0.05).to(rgb.dtype)
                    rgb[i] = (rgb[i] + colour * spot * lit).clamp(0, 1)
    for i in range(n):
        u = float(torch.rand(1, generator=gen))
        if u < 0.25:  # resolution loss (a lower-resolution camera)
            f = float(uni(0.5, 0.9, 1))
            small = F.interpolate(rgb[i:i + 1], scale_factor=f, mode="bilinear",
                                  antialias=True, align_corners=False)
            rgb[i:i + 1] = F.interpolate(small, size=(s, s), mode="bilinear",
                                         align_corners=False)
        elif u < 0.45:  # defocus blur
            sigma = float(uni(0.4, 1.2, 1)) * s / 768
            half = max(1, math.ceil(2.5 * sigma))
            t = torch.arange(-half, half + 1, dtype=torch.float32)
            g = torch.exp(-0.5 * (t / sigma) ** 2)
            g = g / g.sum()
            x = F.conv2d(rgb[i:i + 1].transpose(0, 1), g.view(1, 1, 1, -1), padding=(0, half))
            x = F.conv2d(x, g.view(1, 1, -1, 1), padding=(half, 0))
            rgb[i:i + 1] = x.transpose(0, 1)
    gain = uni(0.8, 1.2, n, 3, 1, 1)
    brightness = uni(0.6, 1.4, n, 1, 1, 1)
    gamma = torch.exp(uni(math.log(0.6), math.log(1.6), n, 1, 1, 1))
    contrast = uni(0.7, 1.3, n, 1, 1, 1)
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    x = ((rgb - mean) * contrast + mean).clamp(0, 1)
    x = (x * gain * brightness).clamp(0, 1) ** gamma
    noise = uni(0.0, 0.02, n, 1, 1, 1) * torch.randn(rgb.shape, generator=gen)
    x = (x + noise).clamp(0, 1)
    return x, target


def sample_pixels(task: str, cases: Sequence[Case], pre: Any, args: argparse.Namespace,
                  gen: Any) -> tuple[Any, Any]:
    """Features and soft targets of sampled pixels of `args.variants` augmented versions of
    every training image: random field-of-view pixels, pixels of each lesion (or the disc),
    and for the disc hard negatives on hard exudates."""
    import torch

    spec = TASKS[task]
    size = spec.size
    extra = ("EX",) if task == "disc" else ()
    xs, ys = [], []
    started = time.time()
    for variant in range(args.variants):
        order = torch.randperm(len(cases), generator=gen).tolist()
        for start in range(0, len(order), 4):
            chunk = [cases[i] for i in order[start:start + 4]]
            rgbs, truths = [], []
            for case in chunk:
                pixels, box = node_input(case.rgb, size)
                rgbs.append(torch.from_numpy(pixels[0]))
                truths.append(torch.from_numpy(np.stack(
                    [soft_truth(case.masks[c], box, size) for c in spec.codes + extra])))
            with torch.no_grad():
                rgb, target = augment(torch.stack(rgbs), torch.stack(truths), gen,
                                      blobs=task == "disc")
                feats, mask = pre(rgb)
            for i in range(len(chunk)):
                inside = torch.nonzero(mask[i, 0].flatten() > 0.5).flatten()
                picks = [inside[torch.randint(len(inside), (args.background,), generator=gen)]]
                for c in range(target.shape[1]):
                    hits = torch.nonzero(target[i, c].flatten() > 0.3).flatten()
                    if len(hits):
                        picks.append(hits[torch.randint(len(hits), (args.positives,),
                                                        generator=gen)])
                where = torch.cat(picks)
                flat = feats[i].flatten(1)
                xs.append(flat[:, where].T.contiguous())
                ys.append(target[i, :len(spec.codes)].flatten(1)[:, where].T.contiguous())
        print(f"variant {variant + 1}/{args.variants}: {sum(len(x) for x in xs)} pixels after "
              f"{(time.time() - started) / 60:.1f} min", flush=True)
    return torch.cat(xs), torch.cat(ys).clamp(0, 1)


def train(task: str, cases: Sequence[Case], args: argparse.Namespace) -> tuple[Any, Any, int]:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    pre, net = build_modules(task)
    pre.eval()
    x, y = sample_pixels(task, cases, pre, args, gen)
    net.mean.copy_(x.mean(dim=0))
    net.std.copy_(x.std(dim=0) + 1e-3)
    steps_per_epoch = math.ceil(len(x) / args.batch)
    steps = args.epochs * steps_per_epoch
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=steps, pct_start=0.1
    )
    checkpoints: Path = args.checkpoints / task
    checkpoints.mkdir(parents=True, exist_ok=True)
    started = time.time()
    net.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            logits = net(x[idx])
            loss: Any = F.binary_cross_entropy_with_logits(logits, y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        torch.save({"net": net.state_dict(), "optimiser": optimiser.state_dict(),
                    "epoch": epoch + 1}, checkpoints / f"epoch_{epoch + 1:03d}.pt")
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / len(x):.4f} "
              f"elapsed {(time.time() - started) / 60:.1f} min", flush=True)
    net.eval()
    return pre, net, steps

# --------------------------------------------------------------------------- evaluation


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_case(sess: Any, rgb: NDArray[np.uint8], size: int) -> tuple[dict[str, Any], Box]:
    x, box = node_input(rgb, size)
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(None, {"image": x})
    return {n: v[0] for n, v in zip(names, values, strict=True)}, box


def lesion_hists(sess: Any, cases: Sequence[Case], codes: Sequence[str], size: int,
                 thresholds: dict[str, float] | None = None) -> tuple[
                     dict[str, NDArray[np.int64]], dict[str, NDArray[np.float64]], list[float]]:
    """Per code: (images, 2, BINS+1) histograms; and (images, 3) tp/fp/fn at the threshold."""
    hists: dict[str, list[NDArray[np.int64]]] = {c: [] for c in codes}
    counts: dict[str, list[list[float]]] = {c: [] for c in codes}
    seconds = []
    for case in cases:
        t0 = time.time()
        out, box = run_case(sess, case.rgb, size)
        seconds.append(time.time() - t0)
        fov = find_field_of_view(case.rgb).mask
        for code in codes:
            prob = node_output(out[LESION_NAMES[code]][0], box, case.rgb.shape[:2])
            score, label = prob[fov], case.masks[code][fov]
            hists[code].append(histograms(score, label))
            if thresholds is not None:
                pred = score >= np.float32(thresholds[code])
                counts[code].append([float(np.count_nonzero(pred & label)),
                                     float(np.count_nonzero(pred & ~label)),
                                     float(np.count_nonzero(~pred & label))])
    return ({c: np.stack(h) for c, h in hists.items()},
            {c: np.asarray(v) for c, v in counts.items()}, seconds)


def held_out_thresholds(model_path: Path, data: Path, codes: Sequence[str]) -> dict[str, Any]:
    """Each output's Dice-maximising threshold on the 10 held-out training images."""
    size = TASKS["lesions"].size
    held = [load_case(data, "train", n, codes) for n in HELD_OUT]
    hists, _, _ = lesion_hists(session(model_path), held, codes, size)
    thresholds: dict[str, float] = {}
    figures: dict[str, Any] = {}
    for code in codes:
        pooled = hists[code].sum(axis=0)
        thresholds[code], best = choose_threshold(pooled)
        figures[LESION_NAMES[code]] = {
            "aupr": round(float(average_precision(pooled)), 4), "dice_at_threshold": round(best, 4),
            "threshold": thresholds[code],
            "images_with_lesion": int((hists[code][:, 1].sum(axis=1) > 0).sum())}
    return {"thresholds": thresholds, "figures": figures, "images": HELD_OUT}


def evaluate_lesions(model_path: Path, data: Path, codes: Sequence[str],
                     thresholds: dict[str, float]) -> dict[str, Any]:
    size = TASKS["lesions"].size
    sess = session(model_path)
    test = [load_case(data, "test", n, codes) for n in case_names(data, "test")]
    hists, counts, seconds = lesion_hists(sess, test, codes, size, thresholds)
    weights = bootstrap(len(test))
    result: dict[str, Any] = {"outputs": {}}
    for code in codes:
        h, c = hists[code], counts[code]
        pooled = h.sum(axis=0)
        boot_hist = np.einsum("bi,ijk->bjk", weights, h.astype(np.float64))
        boot_ap = average_precision(boot_hist)
        tp, fp, fn = c.sum(axis=0)
        boot_c = weights @ c
        boot_dice = dice_from(boot_c[:, 0], boot_c[:, 1], boot_c[:, 2])
        with_lesion = h[:, 1].sum(axis=1) > 0
        per_image_ap = average_precision(h[with_lesion])
        result["outputs"][LESION_NAMES[code]] = {
            "aupr": round(float(average_precision(pooled)), 4), "aupr_ci95": interval(boot_ap),
            "dice": round(float(dice_from(np.float64(tp), np.float64(fp), np.float64(fn))), 4),
            "dice_ci95": interval(boot_dice),
            "sensitivity": round(float(tp / (tp + fn)), 4),
            "precision": round(float(tp / (tp + fp)) if tp + fp else math.nan, 4),
            "auc": round(roc_auc_hist(pooled), 4),
            "threshold": thresholds[code],
            "images_with_lesion": int(with_lesion.sum()),
            "per_image_aupr_mean": round(float(np.mean(per_image_ap)), 4),
            "per_image_aupr": {case.name: round(float(a), 4) for case, a in
                               zip([t for t, w in zip(test, with_lesion, strict=True) if w],
                                   per_image_ap, strict=True)},
        }
    result["seconds_per_image"] = round(float(np.median(seconds)), 2)
    result["test_images"] = [c.name for c in test]
    result["threshold_images"] = HELD_OUT
    return result


def disc_figures(out: dict[str, Any], box: Box, truth: NDArray[np.bool_],
                 shape: tuple[int, int], size: int) -> dict[str, float]:
    prob = node_output(out["disc_probability"][0], box, shape)
    mask = prob >= np.float32(0.5)
    inter = float((mask & truth).sum())
    dice = 2 * inter / float(mask.sum() + truth.sum())
    fx, fy = (float(v) for v in out["disc_centre"])
    x, y = box.left + fx * box.width, box.top + fy * box.height  # as point_to_source
    rows, cols = np.nonzero(truth)
    ty, tx = float(rows.mean()) + 0.5, float(cols.mean()) + 0.5  # pixel centres
    true_d = 2 * math.sqrt(float(truth.sum()) / math.pi)
    # as measured_values: a length in the 256 grid times sqrt(row factor * column factor)
    diameter = float(out["disc_diameter"][0]) * math.sqrt(box.height / size * box.width / size)
    error = math.hypot(x - tx, y - ty)
    return {"dice": dice, "centre_error_px": error, "centre_error_fraction": error / true_d,
            "diameter_px": diameter, "true_diameter_px": true_d,
            "diameter_bias_fraction": diameter / true_d - 1.0,
            "centre_inside_true_disc": float(truth[min(int(y), shape[0] - 1),
                                                   min(int(x), shape[1] - 1)])}


def evaluate_disc(model_path: Path, data: Path) -> dict[str, Any]:
    size = TASKS["disc"].size
    sess = session(model_path)
    test = [load_case(data, "test", n, ("OD",)) for n in case_names(data, "test")]
    rows = []
    for case in test:
        out, box = run_case(sess, case.rgb, size)
        figures = disc_figures(out, box, case.masks["OD"], case.rgb.shape[:2], size)
        figures["image"] = case.name  # type: ignore[assignment]
        rows.append(figures)
    weights = bootstrap(len(test))
    picks = [np.repeat(np.arange(len(test)), w.astype(int)) for w in weights]

    def stat(key: str, how: str) -> dict[str, Any]:
        v = np.asarray([r[key] for r in rows], dtype=np.float64)
        f = np.median if how == "median" else np.mean
        return {"value": round(float(f(v)), 4),
                "ci95": interval(np.asarray([f(v[p]) for p in picks]))}

    result: dict[str, Any] = {
        "dice_mean": stat("dice", "mean"), "dice_median": stat("dice", "median"),
        "dice_min": round(min(r["dice"] for r in rows), 4),
        "centre_error_px_median": stat("centre_error_px", "median"),
        "centre_error_px_mean": stat("centre_error_px", "mean"),
        "centre_error_fraction_median": stat("centre_error_fraction", "median"),
        "centre_error_fraction_max": round(max(r["centre_error_fraction"] for r in rows), 4),
        "diameter_bias_fraction_mean": stat("diameter_bias_fraction", "mean"),
        "diameter_abs_error_fraction_mean": {
            "value": round(float(np.mean([abs(r["diameter_bias_fraction"]) for r in rows])), 4)},
        "centre_inside_true_disc": round(
            float(np.mean([r["centre_inside_true_disc"] for r in rows])), 4),
        "per_image": rows, "test_images": [c.name for c in test],
    }
    return result


def evaluate_chase(model_path: Path, chase: Path) -> dict[str, Any]:
    """No disc truth on CHASE_DB1: check that the detected centre lies where the main vessels
    converge (the first observer's vessel mask is densest in a disc-sized window there)."""
    size = TASKS["disc"].size
    sess = session(model_path)
    rows = []
    for path in sorted((chase / "images").glob("Image_*.jpg")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        manual = chase / "manual" / f"{path.stem}_1stHO.png"
        vessels = np.asarray(Image.open(manual).convert("L")) > 0
        out, box = run_case(sess, rgb, size)
        fx, fy = (float(v) for v in out["disc_centre"])
        x, y = box.left + fx * box.width, box.top + fy * box.height
        diameter = float(out["disc_diameter"][0]) * box.width / size
        # vessel density in windows of about a disc diameter (100 px at 999x960)
        w = 100
        integral = np.pad(vessels.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        dens = (integral[w:, w:] - integral[:-w, w:] - integral[w:, :-w]
                + integral[:-w, :-w]) / w**2
        here = dens[min(max(int(y) - w // 2, 0), dens.shape[0] - 1),
                    min(max(int(x) - w // 2, 0), dens.shape[1] - 1)]
        rank = float((dens > here).mean())  # fraction of windows denser than the detected one
        rows.append({"image": path.stem, "x": round(x, 1), "y": round(y, 1),
                     "diameter_px": round(diameter, 1),
                     "vessel_density_rank": round(rank, 4),
                     "lit": bool(rgb[min(int(y), rgb.shape[0] - 1),
                                     min(int(x), rgb.shape[1] - 1)].max() > 40)})
    ranks = np.asarray([r["vessel_density_rank"] for r in rows])
    return {"images": len(rows), "centre_in_top_5pct_vessel_density": float((ranks <= 0.05).mean()),
            "centre_lit": float(np.mean([r["lit"] for r in rows])),
            "diameter_px_median": float(np.median([r["diameter_px"] for r in rows])),
            "per_image": rows}


# --------------------------------------------------------------------------- main


def disc_threshold(sess: Any, cases: Sequence[Case]) -> tuple[float, float]:
    """Threshold (on the unshifted graph) maximising pooled Dice over the training images."""
    size = TASKS["disc"].size
    total = np.zeros((2, BINS + 1), dtype=np.int64)
    for case in cases:
        out, box = run_case(sess, case.rgb, size)
        prob = node_output(out["disc_probability"][0], box, case.rgb.shape[:2])
        fov = find_field_of_view(case.rgb).mask
        total += histograms(prob[fov], case.masks["OD"][fov])
    return choose_threshold(total)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IDRiD folder")
    parser.add_argument("--chase", type=Path, default=REPO.parent / "shared" / "data" / "CHASE_DB1")
    parser.add_argument("--out", type=Path, help="model folder (default model_registry/<id>/<v>)")
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/idrid_seg_checkpoints"))
    parser.add_argument("--variants", type=int, default=3,
                        help="augmented versions of each training image to sample pixels from")
    parser.add_argument("--background", type=int, default=4000,
                        help="random field-of-view pixels sampled per image version")
    parser.add_argument("--positives", type=int, default=1500,
                        help="pixels sampled per image version from each lesion (disc) mask")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ma-min-aupr", type=float, default=0.25,
                        help="lesions: ship the microaneurysm output only if its held-out "
                             "AUPR reaches this (fixed before any test figure was seen)")
    parser.add_argument("--from-checkpoint", type=Path,
                        help="export and measure this epoch checkpoint instead of training")
    parser.add_argument("--smoke", action="store_true",
                        help="2 training images, 2 threshold and 2 test images: checks the "
                             "pipeline only; never write its output into the registry")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="measure the existing model.onnx instead of training")
    args = parser.parse_args(argv)
    spec = TASKS[args.task]
    out: Path = args.out or REPO / "model_registry" / spec.model_id / spec.version

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    np.random.seed(SEED)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    started = time.time()
    model_path = out / "model.onnx"
    train_names = case_names(args.data, "train")
    if args.task == "lesions":
        train_names = [n for n in train_names if n not in HELD_OUT]
    if args.smoke:
        global HELD_OUT, TEST_LIMIT
        train_names, HELD_OUT, TEST_LIMIT = train_names[:2], HELD_OUT[:2], 2
    training: dict[str, Any] = {}
    result: dict[str, Any] = {}
    codes: tuple[str, ...] = spec.codes
    if args.evaluate_only:
        previous = json.loads((out / "metrics.json").read_text())
        training = previous.get("training") or {}
        codes = tuple(training.get("codes", codes))
    else:
        codes_all = spec.codes + (("EX",) if args.task == "disc" else ())
        cases = [load_case(args.data, "train", n, codes_all) for n in train_names]
        print(f"loaded {len(cases)} training images after {time.time() - started:.0f} s",
              flush=True)
        if args.from_checkpoint is not None:
            pre, net = build_modules(args.task)
            state = torch.load(args.from_checkpoint, weights_only=False)
            net.load_state_dict(state["net"])
            pre.eval()
            net.eval()
            steps = -1  # see the training log of the run that wrote the checkpoint
        else:
            pre, net, steps = train(args.task, cases, args)
        train_minutes = (time.time() - started) / 60
        shift = 0.0
        if args.task == "disc":
            export_onnx(args.task, exported_module(args.task, pre, net), model_path, codes)
            threshold, dice = disc_threshold(session(model_path), cases)
            shift = math.log(threshold / (1 - threshold))
            result["training_threshold"] = {"threshold": threshold, "train_dice": round(dice, 4),
                                            "logit_shift": round(shift, 4)}
        del cases
        module = exported_module(args.task, pre, net, shift)
        export_onnx(args.task, module, model_path, codes)
        if args.task == "lesions":
            held = held_out_thresholds(model_path, args.data, codes)
            result["held_out_train"] = held
            ma = held["figures"][LESION_NAMES["MA"]]["aupr"]
            if ma < args.ma_min_aupr:
                codes = tuple(c for c in codes if c != "MA")  # MA is the last channel
                module.outputs = len(codes)
                export_onnx(args.task, module, model_path, codes)
                result["microaneurysms_left_out"] = (
                    f"held-out AUPR {ma} < {args.ma_min_aupr}: not shipped")
        training = {
            "steps": steps, "epochs": args.epochs, "batch": args.batch,
            "variants": args.variants, "background": args.background,
            "positives": args.positives, "lr": args.lr, "seed": SEED, "threads": args.threads,
            "train_wall_minutes": round(train_minutes, 1), "torch": torch.__version__,
            "train_images": train_names, "codes": list(codes),
        }
        print(f"exported {model_path} ({model_path.stat().st_size / 1e6:.2f} MB) after "
              f"{train_minutes:.1f} min", flush=True)
    if args.task == "lesions":
        if "held_out_train" not in result:
            result["held_out_train"] = json.loads((out / "metrics.json").read_text())[
                "held_out_train"]
        thresholds = {c: result["held_out_train"]["thresholds"][c] for c in codes}
        result.update(evaluate_lesions(model_path, args.data, codes, thresholds))
        result["dataset"] = ("IDRiD segmentation test (27 images, 1429x949); thresholds chosen "
                             "on 10 held-out training images")
    else:
        result.update(evaluate_disc(model_path, args.data))
        result["dataset"] = "IDRiD segmentation test (27 images, 1429x949), OD masks"
        if (args.chase / "images").is_dir():
            result["chase_db1"] = evaluate_chase(model_path, args.chase)
    result["model"] = spec.model_id
    result["version"] = spec.version
    result["input_size"] = spec.size
    result["training"] = training
    result["total_wall_minutes"] = round((time.time() - started) / 60, 1)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    brief = {k: v for k, v in result.items() if k not in ("per_image", "test_images", "training")}
    if "chase_db1" in brief:
        brief["chase_db1"] = {k: v for k, v in brief["chase_db1"].items() if k != "per_image"}
    print(json.dumps(brief, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

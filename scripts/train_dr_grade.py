#!/usr/bin/env python3
"""Train the `dr-grade` and `dme-risk` reference models: one compact CNN, two ONNX graphs.

One multi-task network (PyTorch CPU, fixed seeds, deterministic algorithms, a checkpoint every
epoch) is trained on the IDRiD disease-grading train split with two heads: the international
DR grade (5 classes) and IDRiD's DME risk (3 classes). It is exported twice (opset 17, dynamic
batch), each graph with one head:
  model_registry/dr-grade/1.0.0/model.onnx   -> dr_grade (N,5), referable_dr (N,2)
  model_registry/dme-risk/1.0.0/model.onnx   -> dme_risk (N,3), referable_dme (N,2)
referable_dr = P(grade >= 2), referable_dme = P(DME risk >= 1): sums of the class
probabilities, so a referable call and the grade never disagree about their own numbers.

Operating thresholds are chosen on training data only: a stratified 20 % of the official train
split (`--holdout`) is held out of the optimiser and the thresholds are the highest that give
sensitivity >= 0.90 on it. Nothing is chosen on the test split: scripts/measure_dr_grade.py
measures the exported graphs on it, once, through the node's own executor.

Pre-processing contract (shared with the node's executor, dicomnode/inference/fov.py):
  node:  find_field_of_view -> square_box -> crop_square -> resize (BOX) to S -> RGB/255 NCHW
  graph: FOV mask from the red channel, per-channel division by the local mean (Gaussian,
         sigma = S/24, within the FOV: gain- and colour-cast-invariant, Graham-like), clamp,
         masked (all fixed, first layers) -> CNN -> softmax heads

torch is needed by this script only, never by the dicomnode package.

Usage:
  .venv/bin/python scripts/train_dr_grade.py train     [--epochs N] [--size S] ...
  .venv/bin/python scripts/train_dr_grade.py export    (ONNX, thresholds, manifests from the
                                                        last checkpoint)
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomnode.inference.fov import crop_square, find_field_of_view, square_box  # noqa: E402
from dicomnode.inference.preprocess import resize_rgb  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "IDRiD" / "grading"
DR_OUT = REPO / "model_registry" / "dr-grade" / "1.0.0"
DME_OUT = REPO / "model_registry" / "dme-risk" / "1.0.0"
DEFAULT_WORK = Path("/tmp/dicomnode-dr-grade")
SEED = 20261201
TARGET_SENSITIVITY = 0.90


# --------------------------------------------------------------------------- data


def read_labels(path: Path) -> list[tuple[str, int, int]]:
    with path.open(newline="") as handle:
        return [(r["image"], int(r["dr_grade"]), int(r["dme_risk"]))
                for r in csv.DictReader(handle)]


def node_crop(rgb: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """The node's geometry: FOV square crop, resized to S x S (uint8 RGB)."""
    box = square_box(find_field_of_view(rgb).box)
    crop = np.ascontiguousarray(crop_square(rgb, box), dtype=np.uint8)
    return resize_rgb(crop, size, size)


def load_split(data: Path, split: str, size: int, work: Path) -> tuple[
    NDArray[np.uint8], NDArray[np.int64], NDArray[np.int64], list[str]
]:
    """Images (N,S,S,3) after the node's crop, grades, DME risks, names. Cached in `work`
    (a temp folder outside the repo; derived images are never committed)."""
    rows = read_labels(data / f"{split}_labels.csv")
    cache = work / f"{split}_{size}.npz"
    names = [r[0] for r in rows]
    if cache.exists():
        with np.load(cache) as z:
            if list(z["names"]) == names:
                return z["images"], z["grade"], z["dme"], names
    images = np.stack([node_crop(np.asarray(Image.open(data / split / n).convert("RGB")), size)
                       for n in names])
    grade = np.array([r[1] for r in rows], dtype=np.int64)
    dme = np.array([r[2] for r in rows], dtype=np.int64)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=images, grade=grade, dme=dme, names=np.array(names))
    return images, grade, dme, names


def holdout_split(grade: NDArray[np.int64], dme: NDArray[np.int64], fraction: float) -> tuple[
    NDArray[np.int64], NDArray[np.int64]
]:
    """Stratified (grade x DME) train / held-out indices, fixed by SEED."""
    rng = np.random.default_rng(SEED)
    held: list[int] = []
    for key in sorted(set(zip(grade.tolist(), dme.tolist(), strict=True))):
        members = np.flatnonzero((grade == key[0]) & (dme == key[1]))
        rng.shuffle(members)
        held.extend(members[: round(fraction * members.size)].tolist())
    mask = np.zeros(grade.size, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


# --------------------------------------------------------------------------- model


def build_modules(size: int) -> tuple[Any, Any]:
    """(Preprocess, Net) torch modules."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Preprocess(nn.Module):
        """Fixed first layers. Output 4 channels: R, G, B each as (x - m) / (m + eps) where m is
        the FOV-weighted Gaussian local mean (sigma = S/24, taken at S/8), clamped to +-3 and
        masked, plus the eroded FOV mask. Dividing by the local mean removes illumination
        gradients, overall gain and colour cast, which differ most between cameras."""

        gx: torch.Tensor
        gy: torch.Tensor

        def __init__(self, size: int) -> None:
            super().__init__()
            self.factor = 8
            sigma = size / 24.0 / self.factor
            half = math.ceil(2.5 * sigma)
            t = torch.arange(-half, half + 1, dtype=torch.float32)
            g = torch.exp(-0.5 * (t / sigma) ** 2)
            g = g / g.sum()
            # Fixed kernels for the 4 channels blurred (R, G, B times the mask, the mask):
            # a kernel built from the input's shape would not export to ONNX.
            self.register_buffer("gx", g.view(1, 1, 1, -1).repeat(4, 1, 1, 1))
            self.register_buffer("gy", g.view(1, 1, -1, 1).repeat(4, 1, 1, 1))
            self.half_width = half
            self.erode = max(1, round(size / 128))

        def blur(self, x: torch.Tensor) -> torch.Tensor:
            size = x.shape[-1]
            x = F.avg_pool2d(x, self.factor)
            x = F.conv2d(x, self.gx, padding=(0, self.half_width), groups=4)
            x = F.conv2d(x, self.gy, padding=(self.half_width, 0), groups=4)
            return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

        def forward(self, rgb: torch.Tensor) -> torch.Tensor:
            red = rgb[:, 0:1]
            peak = torch.amax(red, dim=(2, 3), keepdim=True)
            level = torch.clamp(peak * 0.12, min=12.0 / 255.0)
            mask = (red > level).to(rgb.dtype)
            k = 2 * self.erode + 1
            mask = -F.max_pool2d(-mask, k, stride=1, padding=self.erode)
            smooth = self.blur(torch.cat([rgb * mask, mask], dim=1))
            mean = smooth[:, 0:3] / (smooth[:, 3:4] + 1e-4)
            norm = (rgb - mean) / (mean + 0.02)
            norm = torch.clamp(norm * 2.0, -3.0, 3.0) * mask
            return torch.cat([norm, mask], dim=1)

    def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class Residual(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.a = conv_bn(c, c)
            self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.b(self.a(x)))

    class Net(nn.Module):
        """Strided 3x3 convolutions with one residual block per stage (S/2 ... S/64), then
        global average and max pooling side by side (max keeps a single lesion's evidence),
        dropout and two linear heads: 5 DR-grade logits, 3 DME-risk logits."""

        def __init__(self, widths: Sequence[int] = (16, 24, 40, 64, 96, 128)) -> None:
            super().__init__()
            layers: list[nn.Module] = [conv_bn(4, widths[0], 2)]
            for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
                layers.append(conv_bn(cin, cout, 2))
                if i >= 1:
                    layers.append(Residual(cout))
            self.features = nn.Sequential(*layers)
            self.drop = nn.Dropout(0.3)
            self.grade = nn.Linear(2 * widths[-1], 5)
            self.dme = nn.Linear(2 * widths[-1], 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.features(x)
            pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
            pooled = self.drop(pooled)
            return self.grade(pooled), self.dme(pooled)

    return Preprocess(size), Net()


def exported_modules(pre: Any, net: Any) -> tuple[Any, Any]:
    """(dr-grade module, dme-risk module): RGB [0,1] NCHW in, two probability tensors out."""
    import torch
    from torch import nn

    class DrGrade(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.net = pre, net

        def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            p = torch.softmax(self.net(self.pre(rgb))[0], dim=1)
            referable = p[:, 2:].sum(dim=1, keepdim=True)
            return p, torch.cat([1.0 - referable, referable], dim=1)

    class DmeRisk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.net = pre, net

        def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            p = torch.softmax(self.net(self.pre(rgb))[1], dim=1)
            referable = p[:, 1:].sum(dim=1, keepdim=True)
            return p, torch.cat([1.0 - referable, referable], dim=1)

    return DrGrade().eval(), DmeRisk().eval()


def export_onnx(module: Any, size: int, path: Path, names: tuple[str, str], doc: str) -> None:
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        module, (dummy,), str(path), opset_version=17, input_names=["image"],
        output_names=list(names),
        dynamic_axes={"image": {0: "batch"}, names[0]: {0: "batch"}, names[1]: {0: "batch"}},
        dynamo=False,
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    model.doc_string = doc
    onnx.save(model, str(path))


# --------------------------------------------------------------------------- augmentation
#
# The CPU this is trained on is shared (2 cores, many jobs), so the expensive part of the
# augmentation runs once: every training image is cached, through the fixed pre-processing
# layers, as itself and as one degraded copy (JPEG recompression, lower resolution / blur,
# colour gain, brightness, contrast, gamma, noise). Each step then picks one of the two per
# image and applies cheap augmentation in the normalised domain: rotation (any angle), flip,
# scale, shift, a per-channel contrast factor (a gamma or contrast change of the photograph
# scales (x - m) / m by about that factor), blur and noise.

QUANT = 40.0  # int8 cache: normalised values in [-3, 3] in steps of 1/40


def jpeg_degrade(image: NDArray[np.uint8], quality: int) -> NDArray[np.uint8]:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def degrade(batch: NDArray[np.uint8], gen: Any, rng: np.random.Generator) -> Any:
    """A degraded copy of a (N,S,S,3) uint8 batch as (N,3,S,S) float [0,1]: JPEG (q 20-70,
    60 %), lower resolution (0.35-0.8 and back, 50 %), per-channel gain 0.8-1.2, brightness
    0.5-1.5, contrast 0.7-1.3, gamma 0.6-1.6, noise sigma <= 0.03, inside the fundus only."""
    import torch
    from torch.nn import functional as F

    images = [jpeg_degrade(b, int(rng.integers(20, 70))) if rng.random() < 0.6 else b
              for b in batch]
    rgb = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    n, _, s, _ = rgb.shape

    def uni(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    inside = (rgb[:, 0:1] > 0.05).float()
    for i in range(n):
        if float(torch.rand(1, generator=gen)) < 0.5:
            f = float(uni(0.35, 0.8, 1))
            small = F.interpolate(rgb[i:i + 1], scale_factor=f, mode="bilinear",
                                  antialias=True, align_corners=False)
            rgb[i:i + 1] = F.interpolate(small, size=(s, s), mode="bilinear",
                                         align_corners=False)
    gain = uni(0.8, 1.2, n, 3, 1, 1)
    brightness = uni(0.5, 1.5, n, 1, 1, 1)
    gamma = torch.exp(uni(math.log(0.6), math.log(1.6), n, 1, 1, 1))
    contrast = uni(0.7, 1.3, n, 1, 1, 1)
    mean = (rgb * inside).sum(dim=(1, 2, 3), keepdim=True) / (
        3 * inside.sum(dim=(1, 2, 3), keepdim=True) + 1.0)
    x = ((rgb - mean) * contrast + mean).clamp(0, 1)
    x = (x * gain * brightness).clamp(0, 1) ** gamma
    noise = uni(0.0, 0.03, n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return ((x + noise).clamp(0, 1) * inside).contiguous()


def build_cache(pre: Any, images: NDArray[np.uint8], gen: Any, rng: np.random.Generator,
                batch: int = 16) -> NDArray[np.int8]:
    """(N, 2, 4, S, S) int8: the pre-processed image and a degraded copy."""
    import torch

    out = np.zeros((len(images), 2, 4, images.shape[1], images.shape[2]), dtype=np.int8)
    with torch.no_grad():
        for i in range(0, len(images), batch):
            part = images[i:i + batch]
            clean = torch.from_numpy(part).permute(0, 3, 1, 2).float() / 255.0
            for v, x in enumerate((clean, degrade(part, gen, rng))):
                y = pre(x)
                out[i:i + batch, v] = torch.round(y * QUANT).clamp(-127, 127).to(
                    torch.int8).numpy()
    return out


def feature_cache(work: Path, size: int, pre: Any, images: NDArray[np.uint8]
                  ) -> NDArray[np.int8]:
    """The (N, 2, 4, S, S) cache of `build_cache`, made with its own fixed seeds (so training
    and export see the same cache whether or not it was on disk)."""
    import torch

    path = work / f"features_{size}.npy"
    if path.exists():
        cached: NDArray[np.int8] = np.load(path)
        if cached.shape[0] == len(images):
            return cached
    cached = build_cache(pre, images, torch.Generator().manual_seed(SEED),
                         np.random.default_rng(SEED))
    np.save(path, cached)
    return cached


def recalibrate_batchnorm(net: Any, cache: NDArray[np.int8], batch: int = 16) -> None:
    """Re-estimate every BatchNorm's statistics as the plain average over the clean cached
    training images (no augmentation), then leave the net in eval mode (`--bn clean`).

    The running averages kept during training describe the noisy, augmented inputs of the
    last steps while the weights were still moving fast; on clean images they shrank the
    activations until every image got nearly the same output (held-out AUC ~0.5 in eval mode
    against ~0.7 with batch statistics after 3 epochs). Averaging over the clean training
    images is the standard fix and uses training images only. After the full schedule
    (learning rate decayed to 0) the running averages did better on the held-out images, so
    export keeps them unless `--bn clean` asks for this."""
    import torch

    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for i in range(0, cache.shape[0], batch):
            net(torch.from_numpy(cache[i:i + batch, 0].astype(np.float32) / QUANT))
    net.eval()


def augment(cached: NDArray[np.int8], gen: Any) -> Any:
    """A training batch (N,4,S,S) from cached (N,2,4,S,S) pre-processed images."""
    import torch
    from torch.nn import functional as F

    n = cached.shape[0]
    pick = (torch.rand(n, generator=gen) < 0.5).long().numpy()
    x = torch.from_numpy(cached[np.arange(n), pick].astype(np.float32) / QUANT)
    s = x.shape[-1]

    def uni(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    angle = uni(-math.pi, math.pi, n)
    scale = torch.exp(uni(math.log(0.88), math.log(1.15), n))
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, :, 2] = uni(-0.06, 0.06, n, 2)
    grid = F.affine_grid(theta, [n, 4, s, s], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = (x[:, 3:4] > 0.5).float()
    norm = x[:, :3] * torch.exp(uni(math.log(0.7), math.log(1.4), n, 1, 1, 1)) * uni(
        0.85, 1.15, n, 3, 1, 1)
    blur = torch.rand(n, generator=gen) < 0.25
    if bool(blur.any()):
        k = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k[:, None] * k[None, :]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        norm[blur] = F.conv2d(norm[blur], kernel, padding=1, groups=3)
    norm = norm + uni(0.0, 0.15, n, 1, 1, 1) * torch.randn(norm.shape, generator=gen)
    return torch.cat([norm.clamp(-3, 3) * mask, mask], dim=1).contiguous()


# --------------------------------------------------------------------------- training


def predict(pre: Any, net: Any, images: NDArray[np.uint8], batch: int = 16) -> tuple[
    NDArray[np.float64], NDArray[np.float64]
]:
    """Softmax grade and DME probabilities of un-augmented images (eval mode), exactly as the
    exported graph computes them."""
    import torch

    net.eval()
    grades, dmes = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
            g, d = net(pre(x))
            grades.append(torch.softmax(g, 1).double().numpy())
            dmes.append(torch.softmax(d, 1).double().numpy())
    return np.concatenate(grades), np.concatenate(dmes)


def referable_loss(logits: Any, target: Any, first: int) -> Any:
    """Binary cross-entropy of P(class >= first), the score the referable output reports."""
    import torch

    logp = torch.log_softmax(logits, 1)
    pos = torch.logsumexp(logp[:, first:], 1)
    neg = torch.logsumexp(logp[:, :first], 1)
    y = (target >= first).float()
    return -(y * pos + (1 - y) * neg).mean()


def train(args: argparse.Namespace) -> None:
    import torch
    from torch.nn import functional as F

    from dicomnode.evaluate.metrics import roc_auc

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    images, grade, dme, names = load_split(args.data, "train", args.size, work)
    fit, held = holdout_split(grade, dme, args.holdout)
    print(f"train split {len(names)}: fit {fit.size}, held out {held.size}", flush=True)
    torch.manual_seed(SEED)  # weight initialisation and dropout
    pre, net = build_modules(args.size)
    cache = feature_cache(work, args.size, pre, images[fit])
    print(f"cached {cache.shape} after {(time.time() - started) / 60:.1f} min", flush=True)
    gen = torch.Generator().manual_seed(SEED + 1)
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch: int = math.ceil(fit.size / int(args.batch))
    total = steps_per_epoch * args.epochs
    warm = steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    # Inverse square-root class frequency: mild DR (20 images) is not ignored, yet not 7x.
    counts = np.bincount(grade[fit], minlength=5).astype(np.float64)
    weight_grade = torch.tensor((counts.sum() / (5 * np.maximum(counts, 1))) ** 0.5,
                                dtype=torch.float32)
    counts_dme = np.bincount(dme[fit], minlength=3).astype(np.float64)
    weight_dme = torch.tensor((counts_dme.sum() / (3 * np.maximum(counts_dme, 1))) ** 0.5,
                              dtype=torch.float32)
    checkpoint = work / "checkpoint.pt"
    start_epoch, history = 0, []
    if checkpoint.exists() and not args.restart:
        state = torch.load(checkpoint, weights_only=False)
        if state["args"]["size"] == args.size and state["args"]["epochs"] == args.epochs:
            net.load_state_dict(state["net"])
            optimiser.load_state_dict(state["optimiser"])
            schedule.load_state_dict(state["schedule"])
            gen.set_state(state["gen"])
            if "torch_rng" in state:  # dropout's generator (older checkpoints lack it)
                torch.set_rng_state(state["torch_rng"])
            start_epoch, history = state["epoch"], state["history"]
            print(f"resumed after epoch {start_epoch}", flush=True)
    held_images = images[held]
    started = time.time()
    for epoch in range(start_epoch, args.epochs):
        net.train()
        order = torch.randperm(fit.size, generator=gen).numpy()
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch:(step + 1) * args.batch]
            if idx.size < 2:
                continue
            with torch.no_grad():
                x = augment(cache[idx], gen)
            g_true = torch.from_numpy(grade[fit][idx])
            d_true = torch.from_numpy(dme[fit][idx])
            g, d = net(x)
            loss = (F.cross_entropy(g, g_true, weight=weight_grade, label_smoothing=0.05)
                    + 0.7 * F.cross_entropy(d, d_true, weight=weight_dme, label_smoothing=0.05)
                    + 0.5 * referable_loss(g, g_true, 2) + 0.5 * referable_loss(d, d_true, 1))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            running += float(loss.detach())
        pg, pd = predict(pre, net, held_images)
        record = {
            "epoch": epoch + 1, "loss": round(running / steps_per_epoch, 4),
            "held_referable_dr_auc": round(roc_auc(pg[:, 2:].sum(1), grade[held] >= 2), 4),
            "held_referable_dme_auc": round(roc_auc(pd[:, 1:].sum(1), dme[held] >= 1), 4),
            "held_grade_accuracy": round(float((pg.argmax(1) == grade[held]).mean()), 4),
            "lr": schedule.get_last_lr()[0], "minutes": round((time.time() - started) / 60, 2),
        }
        history.append(record)
        torch.save({"net": net.state_dict(), "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(), "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch + 1, "history": history,
                    "args": {k: str(v) if isinstance(v, Path) else v
                             for k, v in vars(args).items()}},
                   work / "checkpoint.tmp")
        os.replace(work / "checkpoint.tmp", checkpoint)
        eta = (time.time() - started) / (epoch + 1 - start_epoch) * (args.epochs - epoch - 1)
        print(json.dumps(record) + f" eta {eta / 60:.1f} min", flush=True)
    export(args)


# --------------------------------------------------------------------------- threshold, export


def sensitivity_threshold(scores: NDArray[np.float64], positive: NDArray[np.bool_],
                          target: float) -> float:
    """The highest threshold (2 decimals, rounded down) with sensitivity >= target."""
    pos = np.sort(scores[positive])
    # Keep at least ceil(target * P) positives at or above the threshold.
    keep = math.ceil(target * pos.size - 1e-9)
    cut = pos[pos.size - keep]
    return float(math.floor(cut * 100) / 100)


def check_onnx(path: Path, images: NDArray[np.uint8], expected: NDArray[np.float64]) -> None:
    """The exported graph gives what torch gave (first output), or export fails."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (images.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
    got = session.run(None, {"image": np.ascontiguousarray(x)})[0]
    if not np.allclose(got, expected, atol=1e-4):
        raise SystemExit(f"{path}: ONNX differs from torch by {np.abs(got - expected).max()}")


def export(args: argparse.Namespace) -> None:
    import torch

    from dicomnode.evaluate.metrics import roc_auc

    state = torch.load(args.work / "checkpoint.pt", weights_only=False)
    size = int(state["args"]["size"])
    pre, net = build_modules(size)
    net.load_state_dict(state["net"])
    images, grade, dme, _ = load_split(args.data, "train", size, args.work)
    fit, held = holdout_split(grade, dme, float(state["args"]["holdout"]))
    if args.bn == "clean":
        recalibrate_batchnorm(net, feature_cache(args.work, size, pre, images[fit]))
    net.eval()
    pg, pd = predict(pre, net, images[held])
    dr_score, dme_score = pg[:, 2:].sum(1), pd[:, 1:].sum(1)
    dr_pos, dme_pos = grade[held] >= 2, dme[held] >= 1
    thresholds = {
        "referable_dr": sensitivity_threshold(dr_score, dr_pos, TARGET_SENSITIVITY),
        "referable_dme": sensitivity_threshold(dme_score, dme_pos, TARGET_SENSITIVITY),
    }
    held_figures = {}
    for key, score, pos in (("referable_dr", dr_score, dr_pos),
                            ("referable_dme", dme_score, dme_pos)):
        t = thresholds[key]
        held_figures[key] = {
            "auc": round(roc_auc(score, pos), 4),
            "sensitivity": round(float((score[pos] >= t).mean()), 4),
            "specificity": round(float((score[~pos] < t).mean()), 4),
            "positives": int(pos.sum()), "negatives": int((~pos).sum()), "threshold": t,
        }
    dr_module, dme_module = exported_modules(pre, net)
    export_onnx(dr_module, size, DR_OUT / "model.onnx", ("dr_grade", "referable_dr"),
                "dr-grade 1.0.0: RGB [0,1] NCHW -> DR grade probabilities (N,5), "
                "referable (grade >= 2) probabilities (N,2)")
    export_onnx(dme_module, size, DME_OUT / "model.onnx", ("dme_risk", "referable_dme"),
                "dme-risk 1.0.0: RGB [0,1] NCHW -> IDRiD DME risk probabilities (N,3), "
                "referable (risk >= 1) probabilities (N,2)")
    check_onnx(DR_OUT / "model.onnx", images[held[:4]], pg[:4])
    check_onnx(DME_OUT / "model.onnx", images[held[:4]], pd[:4])
    training = {
        "seed": SEED, "size": size, "torch": torch.__version__,
        "fit_images": int(fit.size), "held_out_images": int(held.size),
        "args": state["args"], "epochs_run": state["epoch"],
        "train_wall_minutes": state["history"][-1]["minutes"] if state["history"] else None,
        "history": state["history"],
        "batchnorm_statistics": args.bn,
        "thresholds": thresholds,
        "threshold_rule": f"highest threshold (2 decimals) with sensitivity >= "
                          f"{TARGET_SENSITIVITY} on the held-out part of the train split",
        "held_out_figures": held_figures,
    }
    for model, out in (("dr-grade", DR_OUT), ("dme-risk", DME_OUT)):
        (out / "metrics.json").write_text(json.dumps({"training": training}, indent=2) + "\n")
        write_manifest(out, manifest(model, size, thresholds, []))
    print(json.dumps({"thresholds": thresholds, "held_out": held_figures}, indent=2), flush=True)


# --------------------------------------------------------------------------- manifests

SCT, PRIVATE = "SCT", "99DICOMNODE"
ATTRIBUTION = (
    "IDRiD (Indian Diabetic Retinopathy Image Dataset), CC BY 4.0: Prasanna Porwal, Samiksha "
    "Pachade, Ravi Kamble, Manesh Kokare, Girish Deshmukh, Vivek Sahasrabuddhe, Fabrice "
    "Meriaudeau; Porwal et al., Data 3(3):25, 2018, doi 10.21227/H25W98"
)


def _code(scheme: str, value: str, meaning: str) -> dict[str, str]:
    return {"scheme": scheme, "value": value, "meaning": meaning}


def _referable_classes(prefix: str) -> list[dict[str, Any]]:
    # Yes / No of DICOM CID 230 (docs/results.md, "Diabetic screening codes"); the concept
    # (referable DR, referable DME) says what is answered.
    return [{"label": "non-referable", "code": _code(SCT, "373067005", "No")},
            {"label": "referable", "code": _code(SCT, "373066001", "Yes")}]


def manifest(model: str, size: int, thresholds: dict[str, float],
             metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of `dr-grade` or `dme-risk` (codes provisional, see CARD.md)."""
    image = {"name": "image", "layout": "NCHW", "size": [size, size], "colour": "RGB",
             "normalisation": {"scale": 1 / 255, "mean": [0.0], "std": [1.0]},
             "dtype": "float32", "batch": "dynamic", "crop_fov": True}
    training = (f"{ATTRIBUTION}. Official train split (413 images): {413 - 83} fitted, a "
                "stratified 83 held out to choose the operating threshold; trained by "
                "scripts/train_dr_grade.py (PyTorch CPU, fixed seed). Test split (103) for "
                "figures only")
    common = {
        "version": "1.0.0", "task": "classification", "modalities": ["OP", "XC", "OT"],
        "requirements": {"colour": "colour", "min_width": 256, "min_height": 256},
        "file": "model.onnx", "inputs": [image],
    }
    provenance = {
        "authors": ["dicomnode contributors"],
        "training_data": training,
        "licence": "Apache-2.0 (model); trained on IDRiD, CC BY 4.0 (" + ATTRIBUTION + ")",
        "card": "CARD.md",
    }
    if model == "dr-grade":
        outputs = [
            {"kind": "probabilities", "name": "dr_grade", "summary": "worst",
             "concept": _code(SCT, "4855003", "Diabetic retinopathy"),
             "classes": [
                 {"label": "none",
                  "code": _code(PRIVATE, "DR000", "No apparent diabetic retinopathy")},
                 {"label": "mild", "code": _code(
                     SCT, "312903003", "Mild nonproliferative diabetic retinopathy")},
                 {"label": "moderate", "code": _code(
                     SCT, "312904009", "Moderate nonproliferative diabetic retinopathy")},
                 {"label": "severe", "code": _code(
                     SCT, "312905005", "Severe nonproliferative diabetic retinopathy")},
                 {"label": "proliferative",
                  "code": _code(SCT, "59276001", "Proliferative diabetic retinopathy")},
             ]},
            {"kind": "probabilities", "name": "referable_dr", "summary": "worst",
             "concept": _code(PRIVATE, "DR100", "Referable diabetic retinopathy"),
             "classes": _referable_classes("DR"), "positive": "referable",
             "threshold": thresholds["referable_dr"]},
        ]
        head = {
            "id": "dr-grade",
            "name": "Diabetic retinopathy grade and referable DR (compact CNN, IDRiD)",
            "description": (
                "Compact CNN trained from scratch on the IDRiD grading train split: "
                "probabilities over the five international DR grades and referable DR "
                "(grade >= 2, the sum of the moderate, severe and proliferative "
                "probabilities) with an operating threshold chosen for sensitivity >= 0.90 "
                "on held-out training images. Research use; not clinically validated."),
        }
        provenance["intended_use"] = (
            "Research and screening-support triage of macula-centred colour fundus "
            "photographs for referable diabetic retinopathy; not clinically validated.")
        provenance["not_intended_for"] = (
            "Diagnosis or treatment decisions without a clinician; grading mild DR "
            "(microaneurysms are near the resolution limit); cameras, fields and "
            "populations unlike IDRiD's without local validation.")
    else:
        outputs = [
            {"kind": "probabilities", "name": "dme_risk",
             "concept": _code(PRIVATE, "DME000", "Diabetic macular edema risk grade (IDRiD)"),
             "classes": [
                 {"label": "0", "code": _code(PRIVATE, "DME010", "No hard exudates")},
                 {"label": "1", "code": _code(
                     PRIVATE, "DME011",
                     "Hard exudates beyond one disc diameter from the macula centre")},
                 {"label": "2", "code": _code(
                     PRIVATE, "DME012",
                     "Hard exudates within one disc diameter of the macula centre")},
             ]},
            {"kind": "probabilities", "name": "referable_dme", "summary": "worst",
             "concept": _code(SCT, "312912001", "Macular edema due to diabetes mellitus"),
             "classes": _referable_classes("DME"), "positive": "referable",
             "threshold": thresholds["referable_dme"]},
        ]
        head = {
            "id": "dme-risk",
            "name": "Diabetic macular edema risk and referable DME (compact CNN, IDRiD)",
            "description": (
                "The same network as dr-grade with its DME head: probabilities over IDRiD's "
                "DME risk grades 0-2 (hard exudates and their distance from the macula) and "
                "referable DME (risk >= 1) with an operating threshold chosen for "
                "sensitivity >= 0.90 on held-out training images. Research use; not "
                "clinically validated."),
        }
        provenance["intended_use"] = (
            "Research and screening-support triage of macula-centred colour fundus "
            "photographs for hard exudates near the macula (a proxy for DME); not "
            "clinically validated.")
        provenance["not_intended_for"] = (
            "Diagnosing macular oedema (a 2-D photograph sees exudates, not retinal "
            "thickening; OCT does); treatment decisions; cameras and populations unlike "
            "IDRiD's without local validation.")
    return {**head, **common, "outputs": outputs, "requires": ["fundus-quality"],
            "conflicts": [], "provenance": provenance, "metrics": metrics}


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    import yaml

    header = (f"# manifest: model_registry/{data['id']}/1.0.0/manifest.yaml (built by "
              "scripts/train_dr_grade.py and scripts/measure_dr_grade.py)\n")
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(data, sort_keys=False, width=100, allow_unicode=False)
    (out / "manifest.yaml").write_text(header + text)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["train", "export"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IDRiD grading folder")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="cache and checkpoint folder (outside the repo)")
    parser.add_argument("--size", type=int, default=320, help="network input side S")
    parser.add_argument("--epochs", type=int, default=11)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="stratified fraction of the train split kept for thresholds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--bn", choices=["running", "clean"], default="running",
                        help="BatchNorm statistics to export: training's running averages "
                             "(default; held-out AUC 0.744 DR / 0.789 DME after 11 epochs) or "
                             "re-estimated on the clean fit images (0.720 / 0.737)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    np.random.seed(SEED)
    if args.command == "train":
        train(args)
    else:
        export(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

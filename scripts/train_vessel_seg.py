#!/usr/bin/env python3
"""Train the `vessel-seg` reference model: a compact U-Net for retinal vessel segmentation.

Trains with PyTorch on CPU (fixed seeds, deterministic algorithms) on CHASE_DB1 images
01L-10R, picks the decision threshold on those 20 training images, exports ONNX (opset 17,
dynamic batch) to model_registry/vessel-seg/1.0.0/model.onnx and measures the exported
graph on 11L-14R exactly the way the node runs it. Prints the test figures as JSON and
writes them, with S and the threshold, to metrics.json next to the model.

Pre-processing contract (shared with the node's executor, see dicomnode/inference/fov.py):
  node:  find_field_of_view -> square_box -> crop_square -> resize_image(S) -> RGB/255 NCHW
  graph: green-channel emphasis, field-of-view mask, local contrast normalisation within the
         field of view (all fixed, first layers of the graph) -> U-Net -> sigmoid
  node:  resize_probability(box size) -> place_back(source frame) -> threshold

torch is needed by this script only, never by the dicomnode package.

Usage: .venv/bin/python scripts/train_vessel_seg.py [--data ../shared/data/CHASE_DB1]
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

from dicomnode.evaluate.metrics import (  # noqa: E402
    Counts,
    counts_at_thresholds,
    roc_auc,
    segmentation_counts,
    segmentation_figures,
)
from dicomnode.inference.fov import (  # noqa: E402
    crop_square,
    find_field_of_view,
    place_back,
    resize_image,
    resize_probability,
    square_box,
)

TRAIN_IDS = [f"{n:02d}{side}" for n in range(1, 11) for side in "LR"]
TEST_IDS = [f"{n:02d}{side}" for n in range(11, 15) for side in "LR"]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "CHASE_DB1"
DEFAULT_OUT = REPO / "model_registry" / "vessel-seg" / "1.0.0"
SEED = 20261123


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Case:
    name: str
    rgb: NDArray[np.uint8]  # (H, W, 3) source image
    truth: NDArray[np.bool_]  # (H, W) first observer's vessel mask


def load_case(data: Path, name: str) -> Case:
    rgb = np.asarray(Image.open(data / "images" / f"Image_{name}.jpg").convert("RGB"))
    truth = np.asarray(Image.open(data / "manual" / f"Image_{name}_1stHO.png").convert("L")) > 0
    if truth.shape != rgb.shape[:2]:
        raise ValueError(f"{name}: truth {truth.shape} vs image {rgb.shape}")
    return Case(name, rgb, truth)


def node_input(rgb: NDArray[np.uint8], size: int) -> tuple[NDArray[np.float32], Any, Any]:
    """The node's pre-processing: (1, 3, S, S) float32 in [0, 1], the square box, the FOV."""
    fov = find_field_of_view(rgb)
    box = square_box(fov.box)
    small = resize_image(crop_square(rgb, box), size)  # type: ignore[arg-type]
    x = (small.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(x), box, fov


def node_output(prob: NDArray[np.float32], box: Any, shape: tuple[int, int]) -> NDArray[np.float32]:
    """The node's post-processing: back to the box size, then into the source frame."""
    resized = resize_probability(prob, box.height, box.width)
    return place_back(resized, box, shape).astype(np.float32)


def soft_truth(truth: NDArray[np.bool_], box: Any, size: int) -> NDArray[np.float32]:
    """Vessel fraction of each S x S pixel (area-averaged): the training target."""
    crop = crop_square(truth.astype(np.float32), box)
    pil = Image.fromarray(crop, mode="F").resize((size, size), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


# --------------------------------------------------------------------------- evaluation


def predict_full(session: Any, rgb: NDArray[np.uint8], size: int) -> tuple[
    NDArray[np.float32], NDArray[np.bool_]
]:
    """Run an ONNX session the node's way; returns the source-frame probability and FOV mask."""
    x, box, fov = node_input(rgb, size)
    name = session.get_inputs()[0].name
    prob = session.run(None, {name: x})[0][0, 0]
    return node_output(prob, box, rgb.shape[:2]), fov.mask


def choose_threshold(scores: NDArray[np.float32], labels: NDArray[np.bool_]) -> float:
    """Threshold in 0.01..0.99 that maximises pooled Dice."""
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    counts = counts_at_thresholds(scores, labels, grid)
    dices = [segmentation_figures(c)["dice"] for c in counts]
    return float(grid[int(np.nanargmax(dices))])


def evaluate(
    model_path: Path, cases: Sequence[Case], train_cases: Sequence[Case], size: int,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Threshold on `train_cases` (unless given), figures on `cases`, node pre/post-processing.

    Dice, IoU, sensitivity, specificity, accuracy: pooled over all FOV pixels of all test
    images (and, as `per_image_mean`, averaged over images). AUC: pooled over all test FOV
    pixels, exact.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        str(model_path), options, providers=["CPUExecutionProvider"]
    )
    if threshold is None:
        scores, labels = [], []
        for case in train_cases:
            prob, fov = predict_full(session, case.rgb, size)
            scores.append(prob[fov])
            labels.append(case.truth[fov])
        threshold = choose_threshold(np.concatenate(scores), np.concatenate(labels))
    pooled = Counts()
    per_image: list[dict[str, float]] = []
    scores, labels = [], []
    for case in cases:
        prob, fov = predict_full(session, case.rgb, size)
        counts = segmentation_counts(prob >= threshold, case.truth, fov)
        pooled = pooled + counts
        figures = segmentation_figures(counts)
        figures["auc"] = roc_auc(prob[fov], case.truth[fov])
        figures["image"] = case.name  # type: ignore[assignment]
        per_image.append(figures)
        scores.append(prob[fov])
        labels.append(case.truth[fov])
    result: dict[str, Any] = dict(segmentation_figures(pooled))
    result["auc"] = roc_auc(np.concatenate(scores), np.concatenate(labels))
    keys = ["dice", "iou", "sensitivity", "specificity", "accuracy", "auc"]
    result["per_image_mean"] = {k: float(np.mean([f[k] for f in per_image])) for k in keys}
    result["per_image"] = per_image
    result["threshold"] = threshold
    result["input_size"] = size
    result["test_images"] = [c.name for c in cases]
    result["threshold_images"] = [c.name for c in train_cases]
    return result


# --------------------------------------------------------------------------- model


def build_modules(size: int) -> tuple[Any, Any]:
    """(Preprocess, UNet) torch modules."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Preprocess(nn.Module):
        """Fixed first layers: FOV mask from the red channel (as fov.py finds it), green and
        green-weighted luminance, each normalised to zero mean / unit std in a Gaussian
        neighbourhood (sigma = S/48, computed at S/4) within the field of view. Output: 3 channels
        (normalised green, normalised luminance, eroded FOV mask)."""

        # Buffers registered in __init__; declared so that attribute access is typed as a
        # Tensor rather than nn.Module.__getattr__'s `Tensor | Module`.
        gx: torch.Tensor
        gy: torch.Tensor
        mix: torch.Tensor

        def __init__(self, size: int) -> None:
            super().__init__()
            # The neighbourhood statistics are taken at 1/4 resolution (cheap), then
            # up-sampled bilinearly.
            self.factor = 4
            sigma = size / 48.0 / self.factor
            half = math.ceil(2.5 * sigma)
            t = torch.arange(-half, half + 1, dtype=torch.float32)
            g = torch.exp(-0.5 * (t / sigma) ** 2)
            g = g / g.sum()
            self.register_buffer("gx", g.view(1, 1, 1, -1).repeat(5, 1, 1, 1))
            self.register_buffer("gy", g.view(1, 1, -1, 1).repeat(5, 1, 1, 1))
            self.register_buffer(
                "mix", torch.tensor([[0.0, 1.0, 0.0], [0.25, 0.65, 0.10]]).view(2, 3, 1, 1)
            )
            self.half_width = half  # not `self.half`: that would shadow nn.Module.half()
            self.erode = max(1, round(size / 256))  # ~3 px at S = 768

        def blur(self, x: torch.Tensor) -> torch.Tensor:
            size = x.shape[-1]
            x = F.avg_pool2d(x, self.factor)
            x = F.conv2d(x, self.gx, padding=(0, self.half_width), groups=5)
            x = F.conv2d(x, self.gy, padding=(self.half_width, 0), groups=5)
            return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

        def forward(self, rgb: torch.Tensor) -> torch.Tensor:
            red = rgb[:, 0:1]
            peak = torch.amax(red, dim=(2, 3), keepdim=True)
            level = torch.clamp(peak * 0.12, min=12.0 / 255.0)
            mask = (red > level).to(rgb.dtype)
            k = 2 * self.erode + 1
            mask = -F.max_pool2d(-mask, k, stride=1, padding=self.erode)
            grey = F.conv2d(rgb, self.mix)  # (N, 2, S, S)
            stack = torch.cat([grey * mask, grey * grey * mask, mask], dim=1)
            smooth = self.blur(stack)
            weight = smooth[:, 4:5] + 1e-4
            mean = smooth[:, 0:2] / weight
            var = torch.clamp(smooth[:, 2:4] / weight - mean * mean, min=0.0)
            norm = (grey - mean) / torch.sqrt(var + 0.015**2)
            norm = torch.clamp(norm, -6.0, 6.0) * mask
            return torch.cat([norm, mask], dim=1)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class UNet(nn.Module):
        """3-level U-Net, 16-32-64-128 channels, transposed-conv up-sampling; logits out."""

        def __init__(self, cin: int = 3, c: int = 16) -> None:
            super().__init__()
            self.e1, self.e2, self.e3 = block(cin, c), block(c, 2 * c), block(2 * c, 4 * c)
            self.mid = block(4 * c, 8 * c)
            self.u3, self.d3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, 2), block(8 * c, 4 * c)
            self.u2, self.d2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, 2), block(4 * c, 2 * c)
            self.u1, self.d1 = nn.ConvTranspose2d(2 * c, c, 2, 2), block(2 * c, c)
            self.head = nn.Conv2d(c, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.e1(x)
            b = self.e2(F.max_pool2d(a, 2))
            c = self.e3(F.max_pool2d(b, 2))
            m = self.mid(F.max_pool2d(c, 2))
            c = self.d3(torch.cat([self.u3(m), c], 1))
            b = self.d2(torch.cat([self.u2(c), b], 1))
            a = self.d1(torch.cat([self.u1(b), a], 1))
            logits: torch.Tensor = self.head(a)  # Module.__call__ is typed Any
            return logits

    return Preprocess(size), UNet()


def exported_module(pre: Any, net: Any) -> Any:
    from torch import nn

    class VesselSeg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.net = pre, net

        def forward(self, rgb: Any) -> Any:
            return (self.net(self.pre(rgb))).sigmoid()

    return VesselSeg().eval()


def export_onnx(module: Any, size: int, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        module, (dummy,), str(path), opset_version=17, input_names=["image"],
        output_names=["vessel_probability"],
        dynamic_axes={"image": {0: "batch"}, "vessel_probability": {0: "batch"}},
        dynamo=False,
    )
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    model.doc_string = "vessel-seg 1.0.0: RGB [0,1] NCHW -> vessel probability (N,1,S,S)"
    onnx.save(model, str(path))


# --------------------------------------------------------------------------- training


def augment(
    rgb: Any, target: Any, gen: Any
) -> tuple[Any, Any]:
    """Random rotation, flip, scale, colour/brightness/contrast/gamma jitter, resolution loss
    and noise applied to a batch of whole S x S inputs (N,3,S,S) and targets (N,1,S,S)."""
    import torch
    from torch.nn import functional as F

    n, _, s, _ = rgb.shape

    def uni(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    angle = uni(-math.pi, math.pi, n)
    scale = torch.exp(uni(math.log(0.8), math.log(1.25), n))
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, :, 2] = uni(-0.05, 0.05, n, 2)
    grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)
    rgb = F.grid_sample(rgb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    target = F.grid_sample(target, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    # Resolution loss (a lower-resolution camera), sometimes.
    for i in range(n):
        if float(torch.rand(1, generator=gen)) < 0.3:
            f = float(uni(0.45, 0.9, 1))
            small = F.interpolate(rgb[i:i + 1], scale_factor=f, mode="bilinear",
                                  antialias=True, align_corners=False)
            rgb[i:i + 1] = F.interpolate(small, size=(s, s), mode="bilinear",
                                         align_corners=False)
    # Photometric jitter (inside the fundus only: the dark surround stays dark).
    gain = uni(0.85, 1.15, n, 3, 1, 1)
    brightness = uni(0.6, 1.4, n, 1, 1, 1)
    gamma = torch.exp(uni(math.log(0.6), math.log(1.6), n, 1, 1, 1))
    contrast = uni(0.7, 1.3, n, 1, 1, 1)
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    x = ((rgb - mean) * contrast + mean).clamp(0, 1)
    x = (x * gain * brightness).clamp(0, 1) ** gamma
    noise = uni(0.0, 0.02, n, 1, 1, 1) * torch.randn(rgb.shape, generator=gen)
    x = (x + noise).clamp(0, 1)
    return x, target


def train(
    cases: Sequence[Case], size: int, steps: int, batch: int, patch: int, lr: float,
    log_every: int,
) -> tuple[Any, Any]:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    pre, net = build_modules(size)
    pre.eval()

    inputs, targets = [], []
    for case in cases:
        pixels, box, _ = node_input(case.rgb, size)
        inputs.append(torch.from_numpy(pixels[0]))
        targets.append(torch.from_numpy(soft_truth(case.truth, box, size).copy())[None])
    images = torch.stack(inputs)
    truths = torch.stack(targets)

    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    pool_x: torch.Tensor | None = None
    pool_y: torch.Tensor | None = None
    pool_m: torch.Tensor | None = None
    per_round = 16  # batches drawn from one round of augmented whole images
    start = time.time()
    running = 0.0
    net.train()
    for step in range(steps):
        if step % per_round == 0:
            with torch.no_grad():
                pick = torch.randperm(len(cases), generator=gen)[:10]
                rgb, target = augment(images[pick].clone(), truths[pick].clone(), gen)
                feats = pre(rgb)
            pool_x, pool_y, pool_m = feats, target, feats[:, 2]
        assert pool_x is not None and pool_y is not None and pool_m is not None
        # Patches centred on random field-of-view pixels.
        xs, ys = [], []
        for _ in range(batch):
            i = int(torch.randint(pool_x.shape[0], (1,), generator=gen))
            while True:
                r = int(torch.randint(size - patch + 1, (1,), generator=gen))
                c = int(torch.randint(size - patch + 1, (1,), generator=gen))
                if pool_m[i, r + patch // 2, c + patch // 2] > 0:
                    break
            xs.append(pool_x[i, :, r:r + patch, c:c + patch])
            ys.append(pool_y[i, :, r:r + patch, c:c + patch])
        x = torch.stack(xs)
        y = torch.stack(ys)
        logits = net(x)
        prob = logits.sigmoid()
        bce = F.binary_cross_entropy_with_logits(logits, y)
        inter = (prob * y).sum()
        soft_dice = 1 - (2 * inter + 1) / (prob.sum() + y.sum() + 1)
        loss = bce + soft_dice
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running += float(loss.detach())
        if (step + 1) % log_every == 0:
            elapsed = time.time() - start
            print(
                f"step {step + 1}/{steps} loss {running / log_every:.4f} "
                f"lr {schedule.get_last_lr()[0]:.2e} elapsed {elapsed / 60:.1f} min "
                f"eta {elapsed / (step + 1) * (steps - step - 1) / 60:.1f} min",
                flush=True,
            )
            running = 0.0
    net.eval()
    return pre, net


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CHASE_DB1 folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder")
    parser.add_argument("--size", type=int, default=768, help="network input side S")
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--evaluate-only", action="store_true",
                        help="measure the existing model.onnx instead of training")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    np.random.seed(SEED)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    started = time.time()
    train_cases = [load_case(args.data, n) for n in TRAIN_IDS]
    test_cases = [load_case(args.data, n) for n in TEST_IDS]
    model_path = args.out / "model.onnx"
    training: dict[str, Any] = {}
    if not args.evaluate_only:
        pre, net = train(train_cases, args.size, args.steps, args.batch, args.patch, args.lr,
                         args.log_every)
        train_minutes = (time.time() - started) / 60
        export_onnx(exported_module(pre, net), args.size, model_path)
        training = {
            "steps": args.steps, "batch": args.batch, "patch": args.patch, "lr": args.lr,
            "seed": SEED, "threads": args.threads, "train_wall_minutes": round(train_minutes, 1),
            "torch": torch.__version__,
        }
        print(f"exported {model_path} ({model_path.stat().st_size / 1e6:.2f} MB) after "
              f"{train_minutes:.1f} min", flush=True)
    result = evaluate(model_path, test_cases, train_cases, args.size)
    result["model"] = "vessel-seg"
    result["version"] = "1.0.0"
    result["dataset"] = "CHASE_DB1 (1stHO), test 11L-14R; threshold chosen on 01L-10R"
    result["pooling"] = ("dice/iou/sensitivity/specificity/accuracy/auc pooled over all FOV "
                         "pixels of the 8 test images at 999x960; per_image_mean averages them")
    if training:
        result["training"] = training
    elif (args.out / "metrics.json").exists():
        result["training"] = json.loads((args.out / "metrics.json").read_text()).get("training")
    result["total_wall_minutes"] = round((time.time() - started) / 60, 1)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in
               ["dice", "iou", "sensitivity", "specificity", "accuracy", "auc", "threshold",
                "input_size", "per_image_mean"]}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

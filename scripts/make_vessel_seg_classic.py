#!/usr/bin/env python3
"""Build the `vessel-seg-classic` reference model: an unsupervised vessel detector as an ONNX graph.

No learning: every weight is hand-designed. The graph is a multi-scale line detector
(Nguyen et al., Pattern Recognition 2013) on the locally contrast-normalised, inverted
green channel:

1. field-of-view mask from the red channel (as dicomnode/inference/fov.py finds it), eroded;
2. green-weighted grey level, normalised to zero mean / unit std in a Gaussian neighbourhood
   (sigma = S/48) inside the field of view, then inverted (vessels are dark -> bright);
3. for line lengths L in 9, 15, 23, 29, 37 (at S = 768; scaled with S) and 12 orientations:
   mean along the line minus mean in the W x W window (W = 37); max over orientations;
   each scale standardised over the field of view; the scales and the normalised intensity
   averaged (the MSLD combination). W was chosen on four training images (01L, 04R, 07L,
   09R; pooled AUC 0.879 / 0.909 / 0.923 / 0.927 / 0.927 for W = 15 / 21 / 29 / 37 / 45);
4. a fixed logistic squashing to [0, 1] (monotone, so AUC does not depend on it).

Input/output contract as `vessel-seg`: RGB float32 in [0, 1], NCHW, S x S (the node's
field-of-view square crop) -> (N, 1, S, S) float32 score in [0, 1].

The threshold is chosen on CHASE_DB1 01L-10R and the graph measured on 11L-14R exactly as
scripts/train_vessel_seg.py measures `vessel-seg` (same code). torch builds and exports the
graph; it is not needed at run time.

Usage: .venv/bin/python scripts/make_vessel_seg_classic.py [--data ../shared/data/CHASE_DB1]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import train_vessel_seg as shared  # noqa: E402  (evaluation code shared with vessel-seg)

DEFAULT_OUT = shared.REPO / "model_registry" / "vessel-seg-classic" / "1.0.0"


def line_kernels(length: int, angles: int) -> np.ndarray:
    """(angles, 1, length, length) kernels averaging along a centred line of `length` pixels."""
    kernels = np.zeros((angles, 1, length, length), dtype=np.float64)
    centre = (length - 1) / 2.0
    samples = np.linspace(-centre, centre, 8 * length)
    for a in range(angles):
        theta = math.pi * a / angles
        ys = centre - samples * math.sin(theta)
        xs = centre + samples * math.cos(theta)
        for y, x in zip(ys, xs, strict=True):  # bilinear splat
            y0, x0 = math.floor(y), math.floor(x)
            fy, fx = y - y0, x - x0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < length and 0 <= xx < length:
                        kernels[a, 0, yy, xx] += wy * wx
        kernels[a, 0] /= kernels[a, 0].sum()
    return kernels.astype(np.float32)


def build_module(size: int, reach: int = 18) -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    scale = size / 768.0
    window = 2 * round(reach * scale) + 1  # 37 at S = 768
    lengths = sorted({2 * round(f * reach * scale) + 1 for f in (0.2, 0.4, 0.6, 0.8, 1.0)})
    angles = 12

    class ClassicVessels(nn.Module):
        # Buffers registered in __init__; declared so that attribute access is typed as a
        # Tensor rather than nn.Module.__getattr__'s `Tensor | Module`.
        gx: torch.Tensor
        gy: torch.Tensor
        mix: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.factor = 4
            sigma = size / 48.0 / self.factor
            half = math.ceil(2.5 * sigma)
            t = torch.arange(-half, half + 1, dtype=torch.float32)
            g = torch.exp(-0.5 * (t / sigma) ** 2)
            g = g / g.sum()
            self.half_width = half  # not `self.half`: that would shadow nn.Module.half()
            self.register_buffer("gx", g.view(1, 1, 1, -1).repeat(3, 1, 1, 1))
            self.register_buffer("gy", g.view(1, 1, -1, 1).repeat(3, 1, 1, 1))
            self.register_buffer("mix", torch.tensor([0.25, 0.65, 0.10]).view(1, 3, 1, 1))
            self.erode = max(1, round(size / 256))
            self.window = window
            self.lines = nn.ParameterList(
                [nn.Parameter(torch.from_numpy(line_kernels(n, angles)), requires_grad=False)
                 for n in lengths]
            )

        def blur(self, x: torch.Tensor) -> torch.Tensor:
            side = x.shape[-1]
            x = F.avg_pool2d(x, self.factor)
            x = F.conv2d(x, self.gx, padding=(0, self.half_width), groups=3)
            x = F.conv2d(x, self.gy, padding=(self.half_width, 0), groups=3)
            return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)

        def standardise(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            count = mask.sum(dim=(2, 3), keepdim=True) + 1.0
            mean = (x * mask).sum(dim=(2, 3), keepdim=True) / count
            var = (((x - mean) * mask) ** 2).sum(dim=(2, 3), keepdim=True) / count
            return (x - mean) / torch.sqrt(var + 1e-6) * mask

        def forward(self, rgb: torch.Tensor) -> torch.Tensor:
            red = rgb[:, 0:1]
            peak = torch.amax(red, dim=(2, 3), keepdim=True)
            level = torch.clamp(peak * 0.12, min=12.0 / 255.0)
            mask = (red > level).to(rgb.dtype)
            mask = -F.max_pool2d(-mask, 2 * self.erode + 1, stride=1, padding=self.erode)
            grey = F.conv2d(rgb, self.mix)
            smooth = self.blur(torch.cat([grey * mask, grey * grey * mask, mask], dim=1))
            weight = smooth[:, 2:3] + 1e-4
            mean = smooth[:, 0:1] / weight
            var = torch.clamp(smooth[:, 1:2] / weight - mean * mean, min=0.0)
            inverted = -torch.clamp((grey - mean) / torch.sqrt(var + 0.015**2), -6.0, 6.0) * mask
            pad = self.window // 2
            window_mean = F.avg_pool2d(inverted, self.window, stride=1, padding=pad,
                                       count_include_pad=True)
            total = self.standardise(inverted, mask)
            for kernel in self.lines:
                n = kernel.shape[-1]
                response = F.conv2d(inverted, kernel, padding=n // 2)
                best = torch.amax(response, dim=1, keepdim=True) - window_mean
                total = total + self.standardise(best, mask)
            combined = total / float(len(self.lines) + 1)
            return torch.sigmoid(3.0 * (combined - 1.0)) * mask

    return ClassicVessels().eval()


def export(module: Any, size: int, path: Path) -> None:
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module, (torch.zeros(1, 3, size, size),), str(path), opset_version=17,
        input_names=["image"], output_names=["vessel_probability"],
        dynamic_axes={"image": {0: "batch"}, "vessel_probability": {0: "batch"}},
        dynamo=False,
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    model.doc_string = ("vessel-seg-classic 1.0.0: multi-scale line detector, hand-designed "
                        "weights; RGB [0,1] NCHW -> vessel score (N,1,S,S) in [0,1]")
    onnx.save(model, str(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared.DEFAULT_DATA, help="CHASE_DB1 folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder")
    parser.add_argument("--size", type=int, default=768, help="network input side S")
    parser.add_argument("--reach", type=int, default=18,
                        help="half-width of the line-detector window at S = 768")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    model_path = args.out / "model.onnx"
    with torch.no_grad():
        export(build_module(args.size, args.reach), args.size, model_path)
    print(f"exported {model_path} ({model_path.stat().st_size / 1e6:.2f} MB)", flush=True)
    if not args.data.exists():
        print(f"{args.data} not found: built the graph, measured nothing", file=sys.stderr)
        return 0
    train_cases = [shared.load_case(args.data, n) for n in shared.TRAIN_IDS]
    test_cases = [shared.load_case(args.data, n) for n in shared.TEST_IDS]
    result = shared.evaluate(model_path, test_cases, train_cases, args.size)
    result["model"] = "vessel-seg-classic"
    result["version"] = "1.0.0"
    result["dataset"] = "CHASE_DB1 (1stHO), test 11L-14R; threshold chosen on 01L-10R"
    result["pooling"] = ("dice/iou/sensitivity/specificity/accuracy/auc pooled over all FOV "
                         "pixels of the 8 test images at 999x960; per_image_mean averages them")
    result["reach"] = args.reach
    result["total_wall_minutes"] = round((time.time() - started) / 60, 1)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in
               ["dice", "iou", "sensitivity", "specificity", "accuracy", "auc", "threshold",
                "input_size", "per_image_mean"]}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

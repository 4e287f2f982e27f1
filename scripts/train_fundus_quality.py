"""Build fundus-quality 2.0.0: hand-designed features, a learned 3-class linear head, one ONNX.

    .venv/bin/python scripts/train_fundus_quality.py --data ../shared/data \
        [--out model_registry/fundus-quality/2.0.0/model.onnx] [--report report.json]

The graph (PyTorch, exported with the TorchScript ONNX exporter, opset 17) takes the node's
256x256 field-of-view crop (RGB / 255) and outputs `quality` = [p(gradable), p(ungradable),
p(not-fundus)] and the raw `quality_features`.

Features (fixed, no training), at 128x128, inside the field of view (luminance above a tenth
of the image's own smoothed maximum, so a dark photograph keeps its field):
- field: coverage of the crop, bright corners (a fundus has a round field on black);
- colour: green/red and blue/red of the mean colour, saturation, grey-ness (a fundus is orange
  red; documents are grey, microscopy purple, skin pinker and bluer);
- brightness: log mean luminance, clipped-white and clipped-black fractions;
- structure after contrast normalisation (green divided by its local mean, 31 px): vessel
  contrast (black top-hat, 7 px, and the fraction of it above 0.06), fine and coarse Laplacian
  energy and their ratio (defocus lowers it, noise raises it), the optic disc's relative
  brightness (9 px mean over 41 px mean, maximum), specular highlights (white spots).
The head is a multinomial logistic regression on the standardised features (Adam, L2, fixed
seed), trained on the TRAIN parts only; the script reports the held-out parts. Every figure
on the card comes from this script's output.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.preprocess import SourceImage, prepare
from dicomnode.registry.manifest import TensorInput
from dicomnode.synthetic import synthetic_fundus

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("gradable", "ungradable", "not-fundus")
SIZE = 256
SPEC = TensorInput.model_validate({
    "name": "image", "layout": "NCHW", "size": [SIZE, SIZE], "colour": "RGB",
    "dtype": "float32", "batch": "dynamic", "crop_fov": True,
    "normalisation": {"scale": 1 / 255, "mean": [0.0], "std": [1.0]},
})
SEED = 20261201
FEATURE_NAMES = (
    "fov_coverage", "bright_corners", "green_over_red", "blue_over_red", "saturation",
    "greyness", "log_luminance", "clipped_white", "clipped_black", "vessel_contrast",
    "vessel_fraction", "log_fine", "log_coarse", "fine_over_coarse", "disc_contrast",
    "specular",
)  # `quality_features` also carries, last, the envelope distance


# --- the graph --------------------------------------------------------------------------------


def _erode(x: torch.Tensor, k: int) -> torch.Tensor:
    return -F.max_pool2d(-x, k, 1, k // 2)


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x, k, 1, k // 2)


def _box(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a k x k box, borders over the part inside; separable (a row pass, then a
    column pass: exact, as the part inside is a rectangle) so big boxes stay cheap."""
    rows = F.avg_pool2d(x, (1, k), 1, (0, k // 2), count_include_pad=False)
    return F.avg_pool2d(rows, (k, 1), 1, (k // 2, 0), count_include_pad=False)


class Features(nn.Module):
    """[N,3,256,256] RGB in [0, 1] -> [N, 16] features (FEATURE_NAMES)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(image, 2)  # 128 x 128
        r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        lum = 0.299 * r + 0.587 * g + 0.114 * b
        smooth = _box(lum, 5)
        peak = smooth.amax(dim=(2, 3), keepdim=True)
        fov = (smooth > 0.1 * peak + 0.004).float()
        inner = _erode(fov, 9)
        count = inner.sum(dim=(2, 3)).clamp(min=1.0)

        def mean_in(t: torch.Tensor) -> torch.Tensor:
            return (t * inner).sum(dim=(2, 3)) / count

        eps = 1e-3
        coverage = fov.mean(dim=(2, 3))
        corners = (fov[..., :12, :12].mean(dim=(2, 3)) + fov[..., :12, -12:].mean(dim=(2, 3))
                   + fov[..., -12:, :12].mean(dim=(2, 3))
                   + fov[..., -12:, -12:].mean(dim=(2, 3))) / 4
        mr, mg, mb = mean_in(r), mean_in(g), mean_in(b)
        top = x.amax(dim=1, keepdim=True)
        bottom = x.amin(dim=1, keepdim=True)
        saturation = mean_in((top - bottom) / (top + 0.02))
        greyness = mean_in(((top - bottom) < 0.03).float())
        luminance = torch.log(mean_in(lum) + 0.01)
        white = mean_in((top > 0.97).float())
        black = mean_in((g < 0.012).float())
        # Contrast normalisation: green over its local mean inside the field.
        local = _box(g * fov, 31) / (_box(fov, 31) + 1e-4)
        norm = g / (local + 0.02)
        closed = _erode(_dilate(norm, 7), 7)
        vessel = F.relu(closed - norm)
        vessel_contrast = mean_in(vessel)
        vessel_fraction = mean_in((vessel > 0.06).float())
        lap_kernel = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]]])
        fine = mean_in(F.conv2d(norm, lap_kernel, padding=1).abs())
        blurred = _box(norm, 5)
        coarse = mean_in((blurred - _box(blurred, 9)).abs())
        disc = ((_box(lum, 9) / (_box(lum, 41) + 0.01)) * inner).amax(dim=(2, 3))
        specular = mean_in(((bottom > 0.85) & (top > 0.9)).float())
        return torch.cat([
            coverage, corners, mg / (mr + eps), mb / (mr + eps), saturation, greyness,
            luminance, white, black, vessel_contrast, vessel_fraction,
            torch.log(fine + 1e-4), torch.log(coarse + 1e-4), fine / (coarse + 1e-3), disc,
            specular,
        ], dim=1)


# The fundus colour envelope: features on which every real fundus photograph looks alike.
# Not clipped white: over-exposed real photographs (CHASE 11, 14) are still fundus photographs.
ENVELOPE = ("green_over_red", "blue_over_red", "saturation", "bright_corners", "specular")
ENVELOPE_STD_FLOOR = 0.02
ENVELOPE_QUANTILE = 0.995


class QualityModel(nn.Module):
    """Features -> standardised -> linear head -> softmax, then the envelope: an image the head
    calls gradable whose appearance lies outside that of the gradable training photographs
    (Euclidean norm of the z-scores over ENVELOPE > the limit) is not a fundus photograph; its
    p(gradable) moves to p(not-fundus)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, head: nn.Linear,
                 envelope: tuple[torch.Tensor, torch.Tensor, float]) -> None:
        super().__init__()
        self.features = Features()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.head = head
        self.register_buffer("env_index", torch.tensor([FEATURE_NAMES.index(n)
                                                        for n in ENVELOPE]))
        self.register_buffer("env_mean", envelope[0])
        self.register_buffer("env_std", envelope[1])
        self.register_buffer("env_limit", torch.tensor(envelope[2]))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.features(image)
        p = torch.softmax(self.head((raw - self.mean) / self.std), dim=1)
        z = (raw[:, self.env_index] - self.env_mean) / self.env_std
        distance = torch.sqrt((z * z).sum(dim=1, keepdim=True))
        limit: torch.Tensor = self.env_limit  # type: ignore[assignment]  # a buffer
        outside = ((distance > limit) & (p[:, 0:1] >= 0.5)).float()
        moved = p[:, 0:1] * outside
        p = torch.cat([p[:, 0:1] - moved, p[:, 1:2], p[:, 2:3] + moved], dim=1)
        return p, torch.cat([raw, distance], dim=1)


def envelope_of(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, floored std and limit (the ENVELOPE_QUANTILE of the training gradable images'
    own distances) over the gradable training images."""
    index = [FEATURE_NAMES.index(n) for n in ENVELOPE]
    gradable = x[y == 0][:, index]
    mean, std = gradable.mean(0), gradable.std(0).clamp(min=ENVELOPE_STD_FLOOR)
    own = torch.sqrt((((gradable - mean) / std) ** 2).sum(dim=1))
    return mean, std, float(torch.quantile(own, ENVELOPE_QUANTILE))


# --- data -------------------------------------------------------------------------------------

Transform = Callable[[NDArray[np.uint8], np.random.Generator], NDArray[np.uint8]]


def _f(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    return rgb.astype(np.float32)


def _u8(values: NDArray[Any]) -> NDArray[np.uint8]:
    out: NDArray[np.uint8] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


def _fov_mask(rgb: NDArray[np.uint8]) -> NDArray[np.bool_]:
    return bool_(_f(rgb).mean(axis=2) > 20)


def bool_(a: NDArray[Any]) -> NDArray[np.bool_]:
    return np.asarray(a, dtype=bool)


def _radial(rgb: NDArray[np.uint8]) -> NDArray[np.float64]:
    """Distance from the field's centre in field radii."""
    mask = _fov_mask(rgb)
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (rgb.shape[0] / 2, rgb.shape[1] / 2)
    radius = math.sqrt(max(mask.sum(), 1) / math.pi)
    yy, xx = np.mgrid[0:rgb.shape[0], 0:rgb.shape[1]]
    return np.asarray(np.hypot(yy - cy, xx - cx) / radius)


# Ungradable, camera-like: each loses the disc and vessels, not just brightness.
def defocus(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    radius = max(rgb.shape[:2]) / rng.uniform(55, 90)
    return np.array(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))


def flash_overexposed(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    return _u8(_f(rgb) * rng.uniform(3.0, 4.5) + rng.uniform(40, 80))


def under_exposed(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    # A photo so dark that the sensor's noise and 8-bit steps are all that is left.
    gain = rng.uniform(0.025, 0.05)
    return _u8(_f(rgb) * gain + rng.normal(0, 1.2, rgb.shape))


def cut_off_field(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    w = rgb.shape[1]
    out = np.zeros_like(rgb)
    dx = int(w * rng.uniform(0.45, 0.6))
    out[:, dx:] = rgb[:, : w - dx]
    return out


def eyelid_occlusion(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    h = rgb.shape[0]
    out = _f(rgb)
    edge = int(h * rng.uniform(0.5, 0.65))
    yy = np.arange(h)[:, None, None]
    veil = 1 / (1 + np.exp((yy - edge) / (h / 60)))  # an eyelid with eyelashes: dark, soft edge
    lashes = rng.uniform(0.0, 0.25, size=(1, rgb.shape[1], 1))
    out = out * (1 - veil) + veil * (out * lashes + 25)
    return _u8(out)


def small_pupil(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    r = _radial(rgb)
    r0 = rng.uniform(0.25, 0.35)
    falloff = np.exp(-((r / r0) ** 4))[..., None]
    blurred = np.array(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(max(rgb.shape) / 200)))
    return _u8(_f(blurred) * falloff * rng.uniform(0.5, 0.8))


def noise(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    return _u8(_f(rgb) + rng.normal(0, rng.uniform(45, 70), rgb.shape) * _fov_mask(rgb)[..., None])


def haze(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    # Heavy cataract / media haze: a bright, slightly yellow veil scattered over the field.
    alpha = rng.uniform(0.75, 0.88)
    veil = np.array([230, 215, 170], np.float32) * rng.uniform(0.85, 1.0)
    soft = np.array(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(max(rgb.shape) / 250)))
    mask = _fov_mask(rgb)[..., None]
    return _u8(np.where(mask, _f(soft) * (1 - alpha) + veil * alpha, _f(rgb)))


UNGRADABLE: dict[str, Transform] = {
    "defocus": defocus, "flash": flash_overexposed, "under_exposed": under_exposed,
    "cut_off": cut_off_field, "eyelid": eyelid_occlusion, "small_pupil": small_pupil,
    "noise": noise, "haze": haze,
}


# Gradable although darker: the structures stay visible (MUST pass).
def dark_gamma(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    return _u8(255 * (_f(rgb) / 255) ** rng.uniform(1.6, 2.2))


def dark_gain(rgb: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
    return _u8(_f(rgb) * rng.uniform(0.3, 0.5))


DARK_GRADABLE: dict[str, Transform] = {"dark_gamma": dark_gamma, "dark_gain": dark_gain}


# Not fundus photographs, made in code.
def _canvas(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(480, 800)), int(rng.integers(480, 1000))


def document(rng: np.random.Generator) -> NDArray[np.uint8]:
    h, w = _canvas(rng)
    page = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(20, 60))
    while y < h - 30:
        x = int(rng.integers(20, 60))
        while x < w - 60:
            word = int(rng.integers(15, 70))
            draw.rectangle([x, y, x + word, y + int(rng.integers(6, 12))],
                           fill=tuple(int(v) for v in rng.integers(0, 70, 3)))
            x += word + int(rng.integers(6, 14))
        y += int(rng.integers(16, 30))
    return _u8(_f(np.array(page)) + rng.normal(0, 3, (h, w, 3)))


def flat_field(rng: np.random.Generator) -> NDArray[np.uint8]:
    h, w = _canvas(rng)
    colour = rng.integers(20, 240, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    shade = 1 + rng.uniform(-0.2, 0.2) * yy + rng.uniform(-0.2, 0.2) * xx
    return _u8(colour * shade[..., None] + rng.normal(0, 2, (h, w, 3)))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> NDArray[np.float32]:
    small = rng.normal(0, 1, (max(2, int(h / scale)), max(2, int(w / scale))))
    img = Image.fromarray(((small - small.min()) / (np.ptp(small) + 1e-9) * 255).astype(np.uint8))
    resized = np.array(img.resize((w, h), Image.Resampling.BICUBIC), np.float32)
    return (resized / np.float32(255) - np.float32(0.5)).astype(np.float32)


def skin(rng: np.random.Generator) -> NDArray[np.uint8]:
    h, w = _canvas(rng)
    tone = np.array([rng.uniform(150, 235), rng.uniform(100, 180), rng.uniform(80, 150)])
    texture = _smooth_noise(rng, h, w, 40) * 60 + _smooth_noise(rng, h, w, 4) * 25
    return _u8(tone + texture[..., None] + rng.normal(0, 4, (h, w, 3)))


def external_eye(rng: np.random.Generator) -> NDArray[np.uint8]:
    rgb = skin(rng)
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    ew, eh = w * rng.uniform(0.25, 0.4), h * rng.uniform(0.12, 0.22)
    draw.ellipse([cx - ew, cy - eh, cx + ew, cy + eh], fill=(235, 230, 225))
    ir = eh * rng.uniform(0.8, 1.0)
    iris = tuple(int(v) for v in rng.integers(40, 140, 3))
    draw.ellipse([cx - ir, cy - ir, cx + ir, cy + ir], fill=iris)
    draw.ellipse([cx - ir / 2.5, cy - ir / 2.5, cx + ir / 2.5, cy + ir / 2.5], fill=(10, 10, 10))
    return np.array(img.filter(ImageFilter.GaussianBlur(1.5)))


def endoscopy_like(rng: np.random.Generator) -> NDArray[np.uint8]:
    h, w = _canvas(rng)
    tone = np.array([rng.uniform(170, 240), rng.uniform(70, 140), rng.uniform(60, 120)])
    texture = _smooth_noise(rng, h, w, 60) * 120 + _smooth_noise(rng, h, w, 8) * 30
    rgb = tone + texture[..., None]
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(3, 12))):  # wet, glossy surface: white highlights
        y, x, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 15)
        rgb += 255 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))[..., None]
    vignette = np.clip(1.3 - np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2)) * 0.6, 0, 1)
    rgb = rgb * vignette[..., None]
    if rng.random() < 0.6:  # an octagonal scope field on black
        inside = (np.abs(yy - h / 2) / (h / 2) + np.abs(xx - w / 2) / (w / 2)) < 1.5
        inside &= (np.abs(yy - h / 2) < h * 0.47) & (np.abs(xx - w / 2) < w * 0.47)
        rgb = rgb * inside[..., None]
    return _u8(rgb)


def microscopy_like(rng: np.random.Generator) -> NDArray[np.uint8]:
    h, w = _canvas(rng)
    background = np.array([rng.uniform(200, 245), rng.uniform(170, 225), rng.uniform(200, 245)])
    rgb = np.ones((h, w, 3), np.float32) * background
    img = Image.fromarray(_u8(rgb))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(150, 600))):
        y, x, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 12)
        colour = (int(rng.uniform(60, 160)), int(rng.uniform(20, 90)), int(rng.uniform(110, 200)))
        draw.ellipse([x - s, y - s, x + s, y + s], fill=colour)
    pink = _smooth_noise(rng, h, w, 30)[..., None] * np.array([40, -30, 20])
    return _u8(_f(np.array(img.filter(ImageFilter.GaussianBlur(1.2)))) + pink)


NOT_FUNDUS: dict[str, Callable[[np.random.Generator], NDArray[np.uint8]]] = {
    "document": document, "flat_field": flat_field, "skin": skin, "external_eye": external_eye,
    "endoscopy_like": endoscopy_like, "microscopy_like": microscopy_like,
}


def _load(path: Path) -> NDArray[np.uint8]:
    return np.array(Image.open(path).convert("RGB"))


def camera_sets(data: Path) -> dict[str, dict[str, list[Path]]]:
    """camera -> split -> image paths. Tuning uses `train` only."""
    chase = sorted((data / "CHASE_DB1" / "images").glob("Image_*.jpg"))
    idrid = data / "IDRiD"
    return {
        "CHASE_DB1 (Nidek NM-200-D)": {
            "train": [p for p in chase if int(p.stem[6:8]) <= 10],
            "test": [p for p in chase if int(p.stem[6:8]) > 10],
        },
        "IDRiD grading (Kowa VX-10a)": {
            "train": sorted((idrid / "grading" / "train").glob("*.jpg")),
            "test": sorted((idrid / "grading" / "test").glob("*.jpg")),
        },
        "IDRiD segmentation (Kowa VX-10a)": {
            "train": sorted((idrid / "segmentation" / "train" / "images").glob("*.jpg")),
            "test": sorted((idrid / "segmentation" / "test" / "images").glob("*.jpg")),
        },
    }


NEMA_NON_FUNDUS = ("J2KI/VL1_J2KI", "J2KI/VL2_J2KI", "J2KI/VL3_J2KI", "J2KI/VL6_J2KI",
                   "RLE/VL1_RLE", "RLE/VL2_RLE", "RLE/VL3_RLE", "RLE/VL6_RLE")


def _tensor(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    tensor, _ = prepare(SourceImage("1.2.3", rgb), SPEC)
    return np.asarray(tensor, dtype=np.float32)


class Collector:
    """Prepared tensors with labels and where they came from."""

    def __init__(self) -> None:
        self.tensors: list[NDArray[np.float32]] = []
        self.labels: list[int] = []
        self.tags: list[dict[str, str]] = []

    def add(self, rgb: NDArray[np.uint8], label: str, **tags: str) -> None:
        self.tensors.append(_tensor(rgb))
        self.labels.append(CLASSES.index(label))
        self.tags.append({"label": label, **tags})


def _fundus_variants(rgb: NDArray[np.uint8], rng: np.random.Generator, *, everything: bool
                     ) -> Iterator[tuple[str, str, NDArray[np.uint8]]]:
    """(label, variant, image): the original, dark-but-gradable and ungradable versions;
    all of them when `everything`, else the original plus a random few (training)."""
    yield "gradable", "original", rgb
    dark = list(DARK_GRADABLE.items())
    bad = list(UNGRADABLE.items())
    if not everything:
        dark = [dark[int(rng.integers(len(dark)))]]
        bad = [bad[int(i)] for i in rng.choice(len(bad), 4, replace=False)]
    for name, transform in dark:
        yield "gradable", name, transform(rgb, rng)
    for name, transform in bad:
        yield "ungradable", name, transform(rgb, rng)


def cached(cache: Path | None, name: str, make: Callable[[], Collector]) -> Collector:
    """`make()`, or what an earlier run with the same arguments saved in `cache` (uint8)."""
    if cache is None:
        return make()
    path = cache / f"{name}.npz"
    if path.exists():
        with np.load(path) as saved:
            out = Collector()
            out.tensors = [t.astype(np.float32) / 255 for t in saved["tensors"]]
            out.labels = [int(v) for v in saved["labels"]]
            out.tags = json.loads(str(saved["tags"]))
            return out
    out = make()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, tensors=np.stack([np.rint(t * 255).astype(np.uint8) for t in out.tensors]),
             labels=np.array(out.labels), tags=json.dumps(out.tags))
    return out


def build(data: Path, split: str, rng: np.random.Generator, *, per_camera: int | None
          ) -> Collector:
    out = Collector()
    for camera, splits in camera_sets(data).items():
        paths = splits[split]
        if per_camera is not None and len(paths) > per_camera:
            paths = [paths[int(i)] for i in sorted(rng.choice(len(paths), per_camera,
                                                              replace=False))]
        for path in paths:
            rgb = _load(path)
            if max(rgb.shape[:2]) > 720:  # same look, less work (the node crops to 256)
                scale = 720 / max(rgb.shape[:2])
                rgb = np.array(Image.fromarray(rgb).resize(
                    (int(rgb.shape[1] * scale), int(rgb.shape[0] * scale)),
                    Image.Resampling.BOX))
            for label, variant, image in _fundus_variants(rgb, rng,
                                                          everything=split == "test"):
                out.add(image, label, camera=camera, variant=variant, image=path.name)
    # The node's own synthetic fundus (what its demo study and tests send): seeds 0-29 train,
    # 100-119 held out; both eyes, 512 and 768 px.
    seeds = range(30) if split == "train" else range(100, 120)
    for seed in seeds:
        side: Literal["L", "R"] = "R" if seed % 2 == 0 else "L"
        rgb = synthetic_fundus(512 if seed % 3 else 768, side, seed=seed)
        for label, variant, image in _fundus_variants(rgb, rng, everything=split == "test"):
            out.add(image, label, camera="synthetic (dicomnode.synthetic)", variant=variant,
                    image=f"synthetic-{seed}")
    count = 60 if split == "train" else 20
    for name, make in NOT_FUNDUS.items():
        for k in range(count):
            out.add(make(rng), "not-fundus", camera="made in code", variant=name,
                    image=f"{name}-{split}-{k}")
    return out


def nema(data: Path) -> Collector:
    out = Collector()
    folder = data / "dicom-samples" / "NEMA_WG04"
    for name in NEMA_NON_FUNDUS:
        out.add(decode_rgb(pydicom.dcmread(folder / name)), "not-fundus", camera="NEMA WG04",
                variant="non-fundus", image=name)
    out.add(decode_rgb(pydicom.dcmread(folder / "J2KI" / "VL4_J2KI")), "gradable",
            camera="NEMA WG04 VL4 (unknown camera)", variant="original", image="VL4_J2KI")
    return out


# --- training and figures ----------------------------------------------------------------------


def features(model: Features, collector: Collector) -> torch.Tensor:
    with torch.no_grad():
        batches = [model(torch.from_numpy(np.stack(collector.tensors[i:i + 64])))
                   for i in range(0, len(collector.tensors), 64)]
    return torch.cat(batches)


def train_head(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    torch.manual_seed(SEED)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    head = nn.Linear(x.shape[1], len(CLASSES))
    optimiser = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-3)
    # Balance the classes: each contributes equally to the loss.
    weights = torch.tensor([1.0 / max(1, int((y == k).sum())) for k in range(len(CLASSES))])
    weights = weights / weights.sum() * len(CLASSES)
    for _ in range(1500):
        optimiser.zero_grad()
        loss = F.cross_entropy(head(z), y, weight=weights)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    logger.info("training loss %.4f", float(loss.detach()))
    return mean, std, head


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3)]


def predict(probabilities: torch.Tensor) -> list[int]:
    """As the manifest says: gradable when p(gradable) >= 0.5, else the likelier other."""
    out = []
    for p in probabilities.tolist():
        out.append(0 if p[0] >= 0.5 else (1 if p[1] >= p[2] else 2))
    return out


def figures(collector: Collector, predicted: list[int]) -> dict[str, Any]:
    groups: dict[str, list[int]] = {}
    for tags, label, guess in zip(collector.tags, collector.labels, predicted, strict=True):
        hit = int(label == guess)
        for key in (f"{tags['label']}", f"{tags['label']} | {tags['camera']}",
                    f"{tags['label']} | {tags['camera']} | {tags['variant']}"):
            groups.setdefault(key, []).append(hit)
    return {key: {"n": len(v), "correct": sum(v), "sensitivity": round(sum(v) / len(v), 3),
                  "ci95": wilson(sum(v), len(v))} for key, v in sorted(groups.items())}


def add_dark_defocus(collector: Collector, rng: np.random.Generator) -> None:
    """Ungradable: each gradable original, defocused and then darkened (gain 0.12-0.35), made
    on the 256 crop itself (blur radius 2.5-4 px there) so that the cached images serve. A dark
    photo's 8-bit steps must not pass for sharpness."""
    for tensor, tags in list(zip(collector.tensors, collector.tags, strict=True)):
        if tags["label"] != "gradable" or tags["variant"] != "original":
            continue
        crop = Image.fromarray(np.rint(tensor.transpose(1, 2, 0) * 255).astype(np.uint8))
        blurred = np.array(crop.filter(ImageFilter.GaussianBlur(rng.uniform(2.5, 4.0))))
        dark = _u8(_f(blurred) * rng.uniform(0.12, 0.35))
        collector.tensors.append((dark.transpose(2, 0, 1) / np.float32(255)).astype(np.float32))
        collector.labels.append(CLASSES.index("ungradable"))
        collector.tags.append({**tags, "label": "ungradable", "variant": "dark_defocus"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "model_registry" / "fundus-quality" / "2.0.0" / "model.onnx")
    parser.add_argument("--report", type=Path, help="write the figures as JSON here too")
    parser.add_argument("--train-per-camera", type=int, default=160)
    parser.add_argument("--test-per-camera", type=int, default=None,
                        help="at most this many held-out images per camera (default all)")
    parser.add_argument("--cache", type=Path,
                        help="keep the prepared images here between runs (uint8 .npz)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every miss")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    started = time.monotonic()
    rng = np.random.default_rng(SEED)
    extractor = Features().eval()
    tag = f"{args.train_per_camera}-{args.test_per_camera}"
    train = cached(args.cache, f"train-{tag}",
                   lambda: build(args.data, "train", rng, per_camera=args.train_per_camera))
    add_dark_defocus(train, np.random.default_rng(SEED + 2))
    logger.info("train: %d images (%.0f s)", len(train.labels), time.monotonic() - started)
    x_train = features(extractor, train)
    y_train = torch.tensor(train.labels)
    mean, std, head = train_head(x_train, y_train)
    envelope = envelope_of(x_train, y_train)
    model = QualityModel(mean, std, head, envelope).eval()
    test = cached(args.cache, f"test-{tag}",
                  lambda: build(args.data, "test", np.random.default_rng(SEED + 1),
                                per_camera=args.test_per_camera))
    add_dark_defocus(test, np.random.default_rng(SEED + 3))
    held = nema(args.data)
    logger.info("test: %d images, NEMA %d (%.0f s)", len(test.labels), len(held.labels),
                time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(args.out),
                      input_names=["image"], output_names=["quality", "quality_features"],
                      dynamic_axes={"image": {0: "batch"}, "quality": {0: "batch"},
                                    "quality_features": {0: "batch"}},
                      opset_version=17, dynamo=False)
    import onnxruntime as ort

    session = ort.InferenceSession(str(args.out), providers=["CPUExecutionProvider"])

    def run(collector: Collector) -> list[int]:
        probabilities = [session.run(["quality"], {"image": t[None]})[0][0]
                         for t in collector.tensors]
        return predict(torch.tensor(np.stack(probabilities)))

    train_pred, test_pred, nema_pred = run(train), run(test), run(held)
    report = {
        "seed": SEED, "classes": list(CLASSES), "features": list(FEATURE_NAMES),
        "train_images": len(train.labels),
        "train": figures(train, train_pred),
        "test": figures(test, test_pred),
        "nema": [{"image": t["image"], "truth": t["label"], "predicted": CLASSES[p]}
                 for t, p in zip(held.tags, nema_pred, strict=True)],
        "head": {"weight": head.weight.detach().tolist(), "bias": head.bias.detach().tolist(),
                 "mean": mean.tolist(), "std": std.tolist()},
        "envelope": {"features": list(ENVELOPE), "mean": envelope[0].tolist(),
                     "std": envelope[1].tolist(), "limit": envelope[2]},
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.verbose:
        report["test_misses"] = [
            {**t, "predicted": CLASSES[p]} for t, p, y in
            zip(test.tags, test_pred, test.labels, strict=True) if p != y]
    text = json.dumps(report, indent=1)
    if args.report:
        args.report.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()

"""Synthetic colour fundus photographs with their ground truth.

The picture is drawn in a canonical right-eye frame (optic disc on the viewer's right, as in
real fundus photographs) and mirrored for a left eye. Every random choice comes from one
generator seeded by (seed, laterality), so an image is reproducible and the two eyes of a demo
study differ the way real eyes do rather than being exact mirror copies.

Sizes are fractions of the image side so that any `size` gives the same anatomy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

logger = logging.getLogger(__name__)

Laterality = Literal["L", "R"]

# Anatomy as fractions of the image side (a 45-degree, disc-macula centred photograph).
FOV_RADIUS = 0.46
DISC_RADIUS = 0.052
DISC_OFFSET = (-0.012, 0.215)  # (row, col) from the centre, right eye
MACULA_OFFSET = (0.018, -0.055)
MACULA_SIGMA = 0.055
FOVEA_FREE_ZONE = 0.045  # capillary-free zone around the fovea: vessels stop there
MIN_VESSEL_WIDTH = 0.0016
STEP = 0.006
MAX_SEGMENTS = 20_000  # guards against a runaway tree; normal trees use a few thousand

FUNDUS_RGB = np.array([205.0, 92.0, 38.0])
DISC_RGB = np.array([252.0, 212.0, 140.0])
CUP_RGB = np.array([255.0, 236.0, 196.0])
# Vessels absorb green and blue far more than red: they look dark red, veins darker.
VEIN_ABSORPTION = np.array([0.42, 0.62, 0.55])
ARTERY_ABSORPTION = np.array([0.24, 0.46, 0.40])


@dataclass(frozen=True)
class FundusTruth:
    """What the picture contains, in its own pixel coordinates (row, col)."""

    fov_mask: NDArray[np.bool_]
    vessel_mask: NDArray[np.bool_]
    disc_center: tuple[float, float]
    disc_radius: float
    macula_center: tuple[float, float]


@dataclass(frozen=True)
class _Segment:
    x0: float
    y0: float
    x1: float
    y1: float
    width: float
    artery: bool


@dataclass
class _Sprout:
    x: float
    y: float
    heading: float  # radians; x to the right, y down (image rows)
    turn: float  # radians per step: the vessel's curvature
    width: float
    artery: bool
    bend_left: float = math.pi / 3  # total curvature still allowed, so arcs never curl back


def synthetic_fundus(
    size: int = 512, laterality: Laterality = "R", seed: int = 0
) -> NDArray[np.uint8]:
    """A (size, size, 3) uint8 colour fundus photograph; deterministic for a seed."""
    rgb, _ = synthetic_fundus_with_truth(size, laterality, seed)
    return rgb


def synthetic_fundus_with_truth(
    size: int = 512, laterality: Laterality = "R", seed: int = 0
) -> tuple[NDArray[np.uint8], FundusTruth]:
    """The image and its truth (field of view, vessels, disc, macula)."""
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    rng = np.random.default_rng([seed, 0 if laterality == "R" else 1])
    centre = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)

    fov_radius = FOV_RADIUS * size
    radial = np.hypot(yy - centre, xx - centre)
    fov_mask = radial <= fov_radius

    jitter = [float(j) * size for j in rng.normal(0.0, 0.004, size=4)]
    disc = (centre + DISC_OFFSET[0] * size + jitter[0], centre + DISC_OFFSET[1] * size + jitter[1])
    macula = (
        centre + MACULA_OFFSET[0] * size + jitter[2],
        centre + MACULA_OFFSET[1] * size + jitter[3],
    )
    disc_radius = DISC_RADIUS * size * float(rng.uniform(0.92, 1.08))

    image = _background(size, rng, radial, fov_radius, yy, xx)
    image = _add_macula(image, yy, xx, macula, MACULA_SIGMA * size)
    image = _add_disc(image, yy, xx, disc, disc_radius, rng)
    segments = _grow_tree(size, rng, disc, disc_radius, macula, fov_radius)
    vein_depth, artery_depth, vessel_mask = _rasterise(segments, size)
    image *= 1.0 - vein_depth[..., None] * VEIN_ABSORPTION
    image *= 1.0 - artery_depth[..., None] * ARTERY_ABSORPTION
    image += rng.normal(0.0, 2.0, image.shape)  # sensor noise

    # A soft one-pixel rim, then the dark surround of the camera's circular aperture.
    rim = np.clip(fov_radius + 0.5 - radial, 0.0, 1.0)
    surround = rng.uniform(0.0, 5.0, image.shape)
    image = image * rim[..., None] + surround * (1.0 - rim[..., None])
    rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    vessel_mask &= fov_mask

    truth = FundusTruth(fov_mask, vessel_mask, disc, disc_radius, macula)
    if laterality == "L":
        rgb, truth = _mirror(rgb, truth)
    logger.debug("synthetic fundus size=%d laterality=%s seed=%d", size, laterality, seed)
    return rgb, truth


def _background(
    size: int,
    rng: np.random.Generator,
    radial: NDArray[np.float64],
    fov_radius: float,
    yy: NDArray[np.float64],
    xx: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Red-orange fundus with vignetting, a slight tilt of the flash and choroidal mottle."""
    rel = np.clip(radial / fov_radius, 0.0, 1.0)
    falloff = 1.0 - 0.38 * rel**2.2
    tilt_angle = rng.uniform(0.0, 2.0 * math.pi)
    tilt = 0.06 * ((xx * math.cos(tilt_angle) + yy * math.sin(tilt_angle)) / size - 0.5)
    mottle = _smooth_noise(size, cells=12, rng=rng) * 0.07
    light = (falloff + tilt + mottle)[..., None]
    return FUNDUS_RGB[None, None, :] * light


def _smooth_noise(size: int, cells: int, rng: np.random.Generator) -> NDArray[np.float64]:
    """Low-frequency noise in about [-1, 1]: a coarse random grid resized bicubically."""
    coarse = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    pil = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.float64)


def _add_macula(
    image: NDArray[np.float64],
    yy: NDArray[np.float64],
    xx: NDArray[np.float64],
    macula: tuple[float, float],
    sigma: float,
) -> NDArray[np.float64]:
    """Darker macula (pigment) with a slightly darker fovea at its centre."""
    d2 = (yy - macula[0]) ** 2 + (xx - macula[1]) ** 2
    shade = 1.0 - 0.32 * np.exp(-d2 / (2 * sigma**2)) - 0.12 * np.exp(-d2 / (2 * (sigma / 4) ** 2))
    return image * shade[..., None]


def _add_disc(
    image: NDArray[np.float64],
    yy: NDArray[np.float64],
    xx: NDArray[np.float64],
    disc: tuple[float, float],
    radius: float,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """A bright yellowish disc with a soft margin and a paler cup slightly off its centre."""
    d = np.hypot(yy - disc[0], xx - disc[1])
    edge = np.clip((radius - d) / (0.12 * radius) + 0.5, 0.0, 1.0)[..., None]
    cup_ratio = rng.uniform(0.3, 0.45)
    cup_d = np.hypot(yy - disc[0], xx - (disc[1] + 0.1 * radius))
    cup = np.clip((cup_ratio * radius - cup_d) / (0.25 * radius) + 0.5, 0.0, 1.0)[..., None]
    halo = 0.15 * np.exp(-((d / (1.6 * radius)) ** 2))[..., None]
    lit = image * (1.0 + halo)
    disc_colour = DISC_RGB * (1.0 - cup) + CUP_RGB * cup
    return lit * (1.0 - edge) + disc_colour * edge


def _grow_tree(
    size: int,
    rng: np.random.Generator,
    disc: tuple[float, float],
    disc_radius: float,
    macula: tuple[float, float],
    fov_radius: float,
) -> list[_Segment]:
    """Arteries and veins leave the disc in four arcades and branch, narrowing as they go.

    Headings are in the right-eye frame (temporal = viewer's left, the macula side); the
    temporal arcades curve around the macula, the nasal ones fan out towards the right.
    """
    deg = math.pi / 180.0
    # (heading, curvature per step, total bend, starting width) of each main trunk; y grows
    # downwards.
    trunks: list[tuple[float, float, float, float]] = [
        (-100 * deg, -1.3 * deg, 105 * deg, 0.0115),  # superior temporal: up, bending left
        (100 * deg, 1.3 * deg, 105 * deg, 0.0115),  # inferior temporal: down, bending left
        (-55 * deg, 0.35 * deg, 30 * deg, 0.0085),  # superior nasal
        (55 * deg, -0.35 * deg, 30 * deg, 0.0085),  # inferior nasal
        (175 * deg, 0.0, 0.0, 0.0045),  # small macular branches
        (-178 * deg, 0.0, 0.0, 0.004),
        (5 * deg, 0.0, 0.0, 0.005),  # nasal radial branch
    ]
    sprouts: list[_Sprout] = []
    for heading, turn, bend, width in trunks:
        for artery in (False, True):
            offset = rng.normal(0.0, 4.0) * deg + (6 * deg if artery else -6 * deg)
            scale = 0.78 if artery else 1.0
            sprouts.append(
                _Sprout(
                    x=disc[1] + math.cos(heading) * 0.25 * disc_radius,
                    y=disc[0] + math.sin(heading) * 0.25 * disc_radius,
                    heading=heading + offset,
                    turn=turn * rng.uniform(0.85, 1.15),
                    width=width * size * scale * rng.uniform(0.9, 1.1),
                    artery=artery,
                    bend_left=bend,
                )
            )
    centre = (size - 1) / 2.0
    step = STEP * size
    min_width = max(MIN_VESSEL_WIDTH * size, 0.9)
    free_zone = FOVEA_FREE_ZONE * size
    segments: list[_Segment] = []
    while sprouts and len(segments) < MAX_SEGMENTS:
        sprout = sprouts.pop()
        since_branch = 0
        while sprout.width >= min_width and len(segments) < MAX_SEGMENTS:
            if abs(sprout.turn) > sprout.bend_left:
                sprout.turn = math.copysign(sprout.bend_left, sprout.turn)
            sprout.bend_left -= abs(sprout.turn)
            # Wide vessels run straighter than thin ones.
            wobble = 4.0 if sprout.width < 0.005 * size else 2.5
            sprout.heading += sprout.turn + rng.normal(0.0, wobble) * deg
            x1 = sprout.x + math.cos(sprout.heading) * step
            y1 = sprout.y + math.sin(sprout.heading) * step
            if math.hypot(x1 - centre, y1 - centre) > fov_radius * 0.985:
                break
            if math.hypot(x1 - macula[1], y1 - macula[0]) < free_zone:
                break
            segments.append(_Segment(sprout.x, sprout.y, x1, y1, sprout.width, sprout.artery))
            sprout.x, sprout.y = x1, y1
            sprout.width *= 0.992  # vessels taper steadily away from the disc
            since_branch += 1
            if since_branch > 6 and rng.random() < 0.11:
                since_branch = 0
                side = 1.0 if rng.random() < 0.5 else -1.0
                child_width = sprout.width * rng.uniform(0.55, 0.75)
                sprout.width *= 0.9  # a branch takes flow from its parent
                sprouts.append(
                    _Sprout(
                        x=sprout.x,
                        y=sprout.y,
                        heading=sprout.heading + side * rng.uniform(30, 65) * deg,
                        turn=rng.normal(0.0, 0.8) * deg,
                        width=child_width,
                        artery=sprout.artery,
                    )
                )
    return segments


def _rasterise(
    segments: list[_Segment], size: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Vessel darkness for veins and arteries (0..1, anti-aliased) and the vessel mask.

    Each segment darkens pixels within half its width of its centre line, with a
    cross-section that is deeper in the middle like a real vessel's light reflex profile.
    """
    vein = np.zeros((size, size))
    artery = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=bool)
    for seg in segments:
        half = seg.width / 2.0
        pad = half + 1.5
        top = max(math.floor(min(seg.y0, seg.y1) - pad), 0)
        bottom = min(math.ceil(max(seg.y0, seg.y1) + pad) + 1, size)
        left = max(math.floor(min(seg.x0, seg.x1) - pad), 0)
        right = min(math.ceil(max(seg.x0, seg.x1) + pad) + 1, size)
        if bottom <= top or right <= left:
            continue
        py, px = np.mgrid[top:bottom, left:right].astype(np.float64)
        dx, dy = seg.x1 - seg.x0, seg.y1 - seg.y0
        length2 = dx * dx + dy * dy
        t = np.clip(((px - seg.x0) * dx + (py - seg.y0) * dy) / length2, 0.0, 1.0)
        dist = np.hypot(px - (seg.x0 + t * dx), py - (seg.y0 + t * dy))
        coverage = np.clip(half + 0.5 - dist, 0.0, 1.0)
        depth = np.sqrt(np.clip(1.0 - (dist / max(half, 0.5)) ** 2, 0.0, 1.0))
        profile = coverage * (0.75 + 0.25 * depth)
        target = artery if seg.artery else vein
        np.maximum(target[top:bottom, left:right], profile, out=target[top:bottom, left:right])
        mask[top:bottom, left:right] |= dist <= half
    return vein, artery, mask


def _mirror(rgb: NDArray[np.uint8], truth: FundusTruth) -> tuple[NDArray[np.uint8], FundusTruth]:
    """Left-right mirror of an image and its truth (a left eye from a right-eye layout)."""
    width = rgb.shape[1]
    flipped = FundusTruth(
        fov_mask=np.ascontiguousarray(truth.fov_mask[:, ::-1]),
        vessel_mask=np.ascontiguousarray(truth.vessel_mask[:, ::-1]),
        disc_center=(truth.disc_center[0], width - 1 - truth.disc_center[1]),
        disc_radius=truth.disc_radius,
        macula_center=(truth.macula_center[0], width - 1 - truth.macula_center[1]),
    )
    return np.ascontiguousarray(rgb[:, ::-1]), flipped

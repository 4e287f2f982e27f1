"""A mark at a known place in a source image comes back at the same place after
find FOV -> square crop -> resize to the model size -> (model) -> resize back -> place back.

The "model" here sees only the resized crop: it finds a pure-blue mark painted into the
source picture and answers with a probability map at model size. So the picture's forward
path and the mask's way back are both exercised; an offset in either shows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from dicomnode.inference.fov import (
    Box,
    crop_square,
    find_field_of_view,
    place_back,
    resize_image,
    resize_probability,
    square_box,
)
from dicomnode.synthetic import synthetic_fundus_with_truth

MARK_RGB = (0, 0, 255)  # nothing in a fundus is pure blue


def _ellipse(
    shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float]
) -> NDArray[np.bool_]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    inside: NDArray[np.bool_] = (
        ((yy - centre[0]) / axes[0]) ** 2 + ((xx - centre[1]) / axes[1]) ** 2
    ) <= 1.0
    return inside


def _source(
    fundus: int, rows: slice, cols: slice, pad: tuple[int, int, int, int]
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """A fundus picture cut by `rows`/`cols`, then padded (top, bottom, left, right) black."""
    rgb, truth = synthetic_fundus_with_truth(fundus, "R", seed=21)
    top, bottom, left, right = pad
    picture = np.pad(rgb[rows, cols], ((top, bottom), (left, right), (0, 0)))
    fov = np.pad(truth.fov_mask[rows, cols], ((top, bottom), (left, right)))
    return np.ascontiguousarray(picture), fov


def _model(resized: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Probability of 'mark' per pixel: how blue it is beyond its red and green."""
    rgb = resized.astype(np.float32)
    blue_excess = rgb[..., 2] - np.maximum(rgb[..., 0], rgb[..., 1])
    probability: NDArray[np.float32] = np.clip(blue_excess / 255.0, 0.0, 1.0)
    return probability


def _round_trip(source: NDArray[np.uint8], model_size: int) -> tuple[NDArray[np.bool_], Box]:
    fov = find_field_of_view(source)
    box = square_box(fov.box)
    crop = crop_square(source, box)
    resized = resize_image(np.asarray(crop, dtype=np.uint8), model_size)
    assert resized.shape == (model_size, model_size, 3)
    probability = _model(resized)
    back = resize_probability(probability, box.height, box.width)
    placed = place_back(back, box, source.shape[:2])
    return np.asarray(placed) >= 0.5, fov.box


def _centroid(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    rows, cols = np.nonzero(mask)
    return np.array([rows.mean(), cols.mean()])


def _boundary(mask: NDArray[np.bool_]) -> NDArray[np.int64]:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return np.argwhere(mask & ~inner)


def _hausdorff(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    pa, pb = _boundary(a).astype(np.float64), _boundary(b).astype(np.float64)
    d = np.hypot(pa[:, None, 0] - pb[None, :, 0], pa[:, None, 1] - pb[None, :, 1])
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def _bbox(mask: NDArray[np.bool_]) -> Box:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


# (name, fundus side, rows, cols, padding, mark centre as a fraction of the source, model size)
CASES = [
    ("square", 512, slice(None), slice(None), (0, 0, 0, 0), (0.40, 0.62), 256),
    ("landscape-padded", 400, slice(None), slice(None), (0, 0, 60, 140), (0.55, 0.35), 256),
    ("portrait-offset", 420, slice(None), slice(None), (150, 30, 0, 0), (0.45, 0.50), 256),
    # The camera's circle is cut at top and bottom: the square box leaves the image.
    ("cut-top-bottom", 512, slice(70, 442), slice(None), (0, 0, 0, 0), (0.08, 0.45), 256),
    ("cut-left", 512, slice(None), slice(60, None), (0, 0, 0, 0), (0.50, 0.06), 512),
    # A small source enlarged to the model size.
    ("small-upscaled", 240, slice(20, 220), slice(None), (0, 0, 10, 50), (0.30, 0.40), 512),
]


@pytest.mark.parametrize(
    ("name", "fundus", "rows", "cols", "pad", "where", "model_size"),
    CASES,
    ids=[case[0] for case in CASES],
)
def test_mark_comes_back_where_it_was_drawn(
    name: str,
    fundus: int,
    rows: slice,
    cols: slice,
    pad: tuple[int, int, int, int],
    where: tuple[float, float],
    model_size: int,
) -> None:
    source, fov_truth = _source(fundus, rows, cols, pad)
    height, width = source.shape[:2]
    centre = (where[0] * height, where[1] * width)
    axes = (0.045 * fundus, 0.028 * fundus)  # an ellipse: a transposition shows too
    mark = _ellipse((height, width), centre, axes) & fov_truth
    source[mark] = MARK_RGB

    recovered, fov_box = _round_trip(source, model_size)

    # The field of view was found where the picture has it (within a pixel).
    expected = _bbox(fov_truth)
    for got, want in zip(
        (fov_box.top, fov_box.left, fov_box.bottom, fov_box.right),
        (expected.top, expected.left, expected.bottom, expected.right),
        strict=True,
    ):
        assert abs(got - want) <= 1, f"{name}: FOV box {fov_box} vs {expected}"

    assert recovered.any(), f"{name}: the mark was lost"
    # "Within one pixel" is the promise; measured errors are below 0.2 px, and a half-pixel
    # bound makes a result placed one source pixel off fail here.
    shift = np.abs(_centroid(recovered) - _centroid(mark))
    assert shift.max() <= 0.5, f"{name}: centroid moved by {shift}"
    # Boundary: within one model pixel expressed in source pixels (at least one pixel).
    scale = max(fov_box.height, fov_box.width) / model_size
    tolerance = max(1.0, scale) + 0.5
    distance = _hausdorff(recovered, mark)
    assert distance <= tolerance, f"{name}: boundary off by {distance:.2f} > {tolerance:.2f}"
    iou = (recovered & mark).sum() / (recovered | mark).sum()
    assert iou >= 0.85, f"{name}: IoU {iou:.3f}"
    # Nothing appears outside the image's field of view.
    assert not (recovered & ~fov_truth).any()


@pytest.mark.parametrize(
    ("rows", "cols"),
    [
        (slice(497, 508), slice(4, 110)),  # date line, bottom-left corner
        (slice(3, 15), slice(400, 506)),  # eye and camera, top-right corner
        (slice(240, 262), slice(560, 690)),  # a label in the side margin of a wide image
    ],
)
def test_burned_in_annotations_do_not_move_the_field_of_view(rows: slice, cols: slice) -> None:
    source, fov_truth = _source(512, slice(None), slice(None), (0, 0, 0, 200))
    clean = find_field_of_view(source).box
    assert clean == _bbox(fov_truth)
    source[rows, cols] = 255  # white text in the dark surround
    assert find_field_of_view(source).box == clean


def test_a_shifted_result_would_fail() -> None:
    """The centroid check above notices a result placed one source pixel off."""
    source, fov_truth = _source(512, slice(None), slice(None), (0, 0, 0, 0))
    mark = _ellipse(source.shape[:2], (200.0, 300.0), (23.0, 14.0)) & fov_truth
    shifted = np.roll(mark, 1, axis=1)
    assert np.abs(_centroid(shifted) - _centroid(mark)).max() > 0.5


@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    top=st.integers(-30, 45),
    left=st.integers(-30, 45),
    side=st.integers(1, 60),
)
def test_place_back_inverts_crop_square(
    height: int, width: int, top: int, left: int, side: int
) -> None:
    """Inside the image the crop goes back exactly; outside it nothing is invented."""
    rng = np.random.default_rng(height * 1000 + width)
    image = rng.integers(1, 255, (height, width, 3), dtype=np.uint8)
    box = Box(top, left, top + side, left + side)
    crop = crop_square(image, box)
    assert crop.shape == (side, side, 3)
    back = place_back(crop, box, (height, width))
    inside = np.zeros((height, width), dtype=bool)
    rows = slice(max(top, 0), max(min(top + side, height), 0))
    cols = slice(max(left, 0), max(min(left + side, width), 0))
    inside[rows, cols] = True
    assert np.array_equal(back[inside], image[inside])
    assert not back[~inside].any()


@given(
    top=st.integers(-50, 50),
    left=st.integers(-50, 50),
    height=st.integers(1, 80),
    width=st.integers(1, 80),
)
def test_square_box_contains_and_centres(top: int, left: int, height: int, width: int) -> None:
    box = Box(top, left, top + height, left + width)
    square = square_box(box)
    assert square.height == square.width == max(height, width)
    assert square.top <= box.top and square.left <= box.left
    assert square.bottom >= box.bottom and square.right >= box.right
    # Centred to within half a pixel on each axis.
    assert abs((square.top + square.bottom) - (box.top + box.bottom)) <= 1
    assert abs((square.left + square.right) - (box.left + box.right)) <= 1


def test_resized_outputs_are_writable() -> None:
    """Post-processing thresholds and edits maps in place; PIL's arrays are read-only."""
    image = resize_image(np.zeros((20, 20, 3), dtype=np.uint8), 10)
    probability = resize_probability(np.zeros((10, 10), dtype=np.float32), 20, 20)
    image[0, 0] = 1
    probability[0, 0] = 1.0

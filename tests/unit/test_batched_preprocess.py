"""The executor's fast paths equal the reference ones bit for bit: `field_of_view_box` is
`find_field_of_view(...).box`, and `prepare_batch` stacks what `prepare` makes per image."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from dicomnode.inference.fov import field_of_view_box, find_field_of_view, square_box
from dicomnode.inference.preprocess import SourceImage, prepare, prepare_batch
from dicomnode.registry.manifest import TensorInput
from dicomnode.synthetic import synthetic_fundus


def _odd_images(seed: int) -> list[NDArray[np.uint8]]:
    """Noise, near-black, flat discs and annotated frames: thresholds at every grey level."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(40):
        height, width = (int(v) for v in rng.integers(20, 90, 2))
        kind = index % 4
        if kind == 0:
            rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        elif kind == 1:
            rgb = rng.integers(0, 30, (height, width, 3), dtype=np.uint8)
        elif kind == 2:
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[5:height - 3, 7:width - 2] = rng.integers(0, 256)
        else:
            rgb = rng.integers(0, 20, (height, width, 3), dtype=np.uint8)
            rgb[height // 4:3 * height // 4, width // 5:4 * width // 5, 0] = rng.integers(10, 120)
            rgb[0:3, 0:5, 0] = 250  # burnt-in text in the corner
        out.append(rgb)
    return out


def test_field_of_view_box_equals_the_reference() -> None:
    images = [*_odd_images(0), synthetic_fundus(300, "L", 3), synthetic_fundus(257, "R", 4)]
    for rgb in images:
        assert field_of_view_box(rgb) == find_field_of_view(rgb).box, rgb.shape


def _sources() -> list[NDArray[np.uint8]]:
    shifted = np.zeros((400, 560, 3), dtype=np.uint8)
    shifted[:, 20:420] = synthetic_fundus(400, "L", 2)  # the square crop leaves the image
    small = np.zeros((150, 120, 3), dtype=np.uint8)
    small[10:140, 5:115] = 150  # enlarged, not shrunk
    return [synthetic_fundus(400, "R", 1), shifted, small]


BASE: dict[str, Any] = {
    "name": "image", "layout": "NCHW", "size": [256, 256], "colour": "RGB", "dtype": "float32",
    "batch": "dynamic", "crop_fov": True,
    "normalisation": {"scale": 1 / 255, "mean": [0.0], "std": [1.0]},
}


@pytest.mark.parametrize("change", [
    {}, {"size": [320, 320]}, {"size": [368, 368]}, {"size": [300, 200]}, {"layout": "NHWC"},
    {"colour": "BGR", "normalisation": {"scale": 1.0, "mean": [1, 2, 3], "std": [3, 2, 1]}},
    {"colour": "green"}, {"colour": "grey"}, {"dtype": "float16"}, {"crop_fov": False},
    {"dtype": "uint8", "normalisation": {"scale": 1.0, "mean": [0.0], "std": [1.0]}},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_prepare_batch_equals_prepare_image_by_image(change: dict[str, Any]) -> None:
    spec = TensorInput.model_validate({**BASE, **change})
    rgbs = _sources()
    tensors, geometries = prepare_batch([SourceImage(f"b.{i}", x) for i, x in enumerate(rgbs)],
                                        spec)
    assert tensors.shape[0] == len(rgbs)
    for index, rgb in enumerate(rgbs):
        reference = SourceImage("r", rgb, _fov_box=square_box(find_field_of_view(rgb).box))
        want, geometry = prepare(reference, spec)
        assert tensors.dtype == want.dtype
        assert np.array_equal(tensors[index], want), index
        assert geometries[index] == geometry

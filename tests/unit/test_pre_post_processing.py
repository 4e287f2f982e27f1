"""Pre-processing follows the manifest's TensorInput; post-processing maps results back."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dicomnode.inference.fov import Box
from dicomnode.inference.postprocess import classify, gate_reason, point_to_source
from dicomnode.inference.preprocess import Geometry, SourceImage, prepare
from dicomnode.registry.manifest import PointOutput, ProbabilitiesOutput, TensorInput


def spec(**overrides: Any) -> TensorInput:
    base: dict[str, Any] = {"name": "image", "size": [8, 8], "crop_fov": False}
    return TensorInput.model_validate({**base, **overrides})


def flat(r: int, g: int, b: int, shape: tuple[int, int] = (16, 16)) -> SourceImage:
    rgb = np.zeros((*shape, 3), dtype=np.uint8)
    rgb[...] = (r, g, b)
    return SourceImage("1.2.3", rgb)


def test_rgb_nchw_float_normalised() -> None:
    tensor, geometry = prepare(
        flat(255, 51, 0),
        spec(normalisation={"scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.25, 1]}),
    )
    assert tensor.shape == (3, 8, 8) and tensor.dtype == np.float32
    assert tensor[:, 0, 0] == pytest.approx([1.0, (0.2 - 0.5) / 0.25, -0.5])
    assert geometry.box == Box(0, 0, 16, 16) and geometry.size == (8, 8)


def test_bgr_nhwc_uint8() -> None:
    tensor, _ = prepare(
        flat(10, 20, 30),
        spec(layout="NHWC", colour="BGR", dtype="uint8",
             normalisation={"scale": 1.0, "mean": [0.0], "std": [1.0]}),
    )
    assert tensor.shape == (8, 8, 3) and tensor.dtype == np.uint8
    assert tensor[0, 0].tolist() == [30, 20, 10]


def test_green_and_grey_have_one_channel() -> None:
    green, _ = prepare(flat(10, 200, 30), spec(colour="green",
                                               normalisation={"scale": 1.0}))
    grey, _ = prepare(flat(100, 100, 100), spec(colour="grey",
                                                normalisation={"scale": 1.0}))
    assert green.shape == (1, 8, 8) and float(green[0, 0, 0]) == pytest.approx(200)
    assert grey.shape == (1, 8, 8) and float(grey[0, 0, 0]) == pytest.approx(100, abs=0.01)


def test_crop_fov_uses_a_square_around_the_field_of_view() -> None:
    rgb = np.zeros((40, 80, 3), dtype=np.uint8)
    rgb[5:35, 30:60] = (200, 100, 50)  # a 30 x 30 "field of view"
    _, geometry = prepare(SourceImage("1", rgb), spec(crop_fov=True))
    box = geometry.box
    assert (box.top, box.left, box.height, box.width) == (5, 30, 30, 30)


def _probabilities(**overrides: Any) -> ProbabilitiesOutput:
    code = {"scheme": "99T", "value": "X", "meaning": "x"}
    data: dict[str, Any] = {
        "kind": "probabilities", "name": "p",
        "classes": [{"label": "ungradable", "code": {**code, "value": "U"}},
                    {"label": "gradable", "code": {**code, "value": "G"}}],
    }
    return ProbabilitiesOutput.model_validate({**data, **overrides})


def test_threshold_on_the_positive_class_and_gate() -> None:
    output = _probabilities(threshold=0.8, positive="gradable",
                            gate={"ineligible": ["ungradable"], "reason": "ungradable image"})
    below = classify(np.array([0.3, 0.7]), output)
    above = classify(np.array([0.1, 0.9]), output)
    assert (below.label, below.code["value"]) == ("ungradable", "U")
    assert below.probability == pytest.approx(0.3)
    assert above.label == "gradable" and above.probabilities["gradable"] == pytest.approx(0.9)
    assert gate_reason(below, output) == "ungradable image"
    assert gate_reason(above, output) is None


def test_argmax_without_threshold() -> None:
    assert classify(np.array([0.6, 0.4]), _probabilities()).label == "ungradable"
    with pytest.raises(ValueError, match="3 values for 2 classes"):
        classify(np.array([0.2, 0.3, 0.5]), _probabilities())


def test_point_maps_from_crop_to_source() -> None:
    geometry = Geometry((100, 200), Box(10, 50, 90, 130), (32, 32))
    code = {"scheme": "99T", "value": "C", "meaning": "c"}
    normalised = PointOutput(kind="point", name="c", code=code)  # type: ignore[arg-type]
    pixels = PointOutput(kind="point", name="c", code=code,  # type: ignore[arg-type]
                         coordinates="pixels")
    assert point_to_source(np.array([0.5, 0.25]), normalised, geometry) == [90.0, 30.0]
    assert point_to_source(np.array([16.0, 8.0]), pixels, geometry) == [90.0, 30.0]

"""Sizes measured in a model's input pixels reach the report in source pixels and in mm, and a
consumer can take an upstream mask at the upstream's own threshold (`binarise`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicomnode.graph import Selection, resolve
from dicomnode.inference.decode import pixel_spacing
from dicomnode.inference.executor import GraphExecutor
from dicomnode.inference.fov import Box
from dicomnode.inference.outputs import read_index, write_outputs
from dicomnode.inference.postprocess import measured_values
from dicomnode.inference.preprocess import Geometry, SourceImage
from dicomnode.inference.sessions import SessionPool
from dicomnode.registry import load_registry
from dicomnode.registry.manifest import MeasurementOutput
from dicomnode.results.job_outputs import results_from_outputs
from tests.support.onnx_models import (
    BATCH,
    RegistryWriter,
    _model,
    classifier_manifest,
    measurement_manifest,
    segmenter_manifest,
)

CODE = {"scheme": "99TEST", "value": "X1", "meaning": "A size"}
PROBABILITY_THRESHOLD = 0.6


def _output(**extra: Any) -> MeasurementOutput:
    return MeasurementOutput.model_validate(
        {"kind": "measurement", "name": "size", "code": CODE, **extra})


def _geometry(spacing: tuple[float, float] | None) -> Geometry:
    # a 512 x 256 (h x w) source box squeezed into a 128 x 128 model input
    return Geometry((600, 400), Box(10, 20, 522, 276), (128, 128), spacing)


# -- conversion, hand-computed --------------------------------------------------------------


def test_an_area_is_scaled_by_both_factors_then_by_the_pixel_spacing() -> None:
    reported = measured_values(np.array([100.0]), _output(pixel_measure="area"),
                               _geometry((0.01, 0.02)))
    # box 512 x 256 over 128 x 128: rows x4, columns x2 -> 100 * 8 = 800 source pixels
    assert [m.unit.code for m in reported] == ["{px2}", "mm2"]
    assert [m.value for m in reported] == pytest.approx([800.0, 800.0 * 0.01 * 0.02])


def test_a_length_is_scaled_by_the_geometric_mean() -> None:
    reported = measured_values(np.array([[10.0]]), _output(pixel_measure="length"),
                               _geometry((0.01, 0.04)))
    source = 10.0 * math.sqrt(4.0 * 2.0)
    assert reported[0].value == pytest.approx(source)
    assert reported[0].unit.code == "{px}"
    assert reported[1].value == pytest.approx(source * math.sqrt(0.01 * 0.04))
    assert reported[1].unit.code == "mm"


def test_without_pixel_spacing_only_pixels_are_reported() -> None:
    reported = measured_values(np.array([10.0]), _output(pixel_measure="length"), _geometry(None))
    assert [m.unit.code for m in reported] == ["{px}"]


def test_a_declared_unit_is_reported_unchanged() -> None:
    spec = _output(unit={"code": "%", "meaning": "percent"})
    reported = measured_values(np.array([12.5]), spec, _geometry((0.01, 0.01)))
    assert [(m.value, m.unit.code) for m in reported] == [(12.5, "%")]


@pytest.mark.parametrize(("extra", "message"), [
    ({"pixel_measure": "area", "unit": {"code": "mm2", "meaning": "square millimeter"}},
     "leave 'unit' out with 'pixel_measure'"),
    ({}, "needs a 'unit' (or 'pixel_measure"),
    ({"pixel_measure": "volume"}, "pixel_measure"),
])
def test_a_measurement_has_exactly_one_way_to_say_its_unit(extra: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        _output(**extra)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"0.5\\0.25", (0.5, 0.25)),
    (None, None),
    (b"0\\0.1 ", None),  # not positive: treated as absent, not as 0 mm
    (b"abc\\1 ", None),  # not numbers, as a non-conforming camera might write
    (b"0.5 ", None),  # one value
])
def test_pixel_spacing_from_the_header(raw: bytes | None, expected: Any) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    if raw is not None:  # as read from a file: converted only when accessed
        tag = Tag("PixelSpacing")
        ds[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, True, True)
    assert pixel_spacing(ds) == expected


# -- through the executor, the stored outputs and the encoders' inputs -----------------------


def _green_probability() -> onnx.ModelProto:
    """[N,3,32,32] RGB 0..1 -> [N,1,32,32]: the green channel itself, as a probability."""
    nodes = [helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["mask"])]
    inits = [numpy_helper.from_array(np.array([v], dtype=np.int64), n)
             for n, v in (("starts", 1), ("ends", 2), ("axes", 1))]
    graph = helper.make_graph(
        nodes, "green_probability",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH, 3, 32, 32])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [BATCH, 1, 32, 32])], inits)
    return _model(graph)


@pytest.fixture
def registry_root(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    writer = RegistryWriter(root)
    seg = segmenter_manifest("green-prob")
    seg["outputs"][0]["threshold"] = PROBABILITY_THRESHOLD
    writer.add(seg, _green_probability())
    writer.add(measurement_manifest("frac-raw", source="green-prob.mask"))
    binarised = measurement_manifest("frac-bin", source="green-prob.mask")
    binarised["inputs"][0]["binarise"] = True
    writer.add(binarised)
    area = measurement_manifest("frac-area", source="green-prob.mask")
    area["inputs"][0]["binarise"] = True
    area["outputs"][0].pop("unit")
    area["outputs"][0]["pixel_measure"] = "area"
    writer.add(area)
    return root


def _image() -> SourceImage:
    """A 64 x 96 frame, field of view filled with green 0.4, a bright-green square."""
    rgb = np.zeros((64, 96, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:64, 0:96]
    rgb[(yy - 32) ** 2 + (xx - 48) ** 2 < 30 ** 2] = (200, 102, 0)
    rgb[20:36, 40:56] = (200, 255, 0)
    return SourceImage("1.2.3.4", rgb, "R", pixel_spacing=(0.02, 0.03))


def test_binarise_feeds_the_mask_at_the_upstream_threshold(registry_root: Path,
                                                           tmp_path: Path) -> None:
    registry = load_registry(registry_root)
    assert not registry.left_out, registry.left_out
    executor = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"]))
    graph = resolve(Selection.of(["frac-raw", "frac-bin", "frac-area"], modality="OP"),
                    registry)
    image = _image()
    result = executor.run(graph, [image])
    assert result.outcome == "done", result.problems()
    uid = image.sop_instance_uid
    probability = result.models["green-prob"].raw["mask"][uid]
    raw = float(result.models["frac-raw"].raw["fraction"][uid][0])
    binarised = float(result.models["frac-bin"].raw["fraction"][uid][0])
    assert raw == pytest.approx(float(probability.mean()), rel=1e-5)
    assert binarised == pytest.approx(float((probability >= PROBABILITY_THRESHOLD).mean()))
    assert 0.0 < binarised < raw  # the square alone passes 0.6; the 0.4 background does not

    folder = tmp_path / "job"
    write_outputs(folder, result, registry, {"job": 1})
    entry = read_index(folder)["models"]["frac-area"]["outputs"]["fraction"]["per_image"][uid]
    geometry = result.models["frac-area"].geometry[uid]
    assert geometry.pixel_spacing == (0.02, 0.03)
    side = geometry.box.height  # the square crop around the field of view, in source pixels
    in_source = binarised * (side / 32) ** 2
    assert [v["unit"]["code"] for v in entry["values"]] == ["{px2}", "mm2"]
    assert entry["values"][0]["value"] == pytest.approx(in_source, rel=1e-5)
    assert entry["values"][1]["value"] == pytest.approx(in_source * 0.02 * 0.03, rel=1e-5)

    findings = results_from_outputs(folder, registry).findings[uid]
    reported = [m for m in findings.measurements if m.algorithm.key.startswith("frac-area")]
    assert [m.unit.code for m in reported] == ["{px2}", "mm2"]
    assert [m.value for m in reported] == pytest.approx([in_source, in_source * 0.0006],
                                                        rel=1e-5)


def test_binarising_an_output_that_is_not_a_mask_is_refused(tmp_path: Path) -> None:
    writer = RegistryWriter(tmp_path / "registry")
    writer.add(classifier_manifest("quality"))
    consumer = measurement_manifest("from-probs", source="quality.probabilities")
    consumer["inputs"][0]["binarise"] = True
    writer.add(consumer)
    registry = load_registry(tmp_path / "registry")
    reasons = {lo.id: lo.reason for lo in registry.left_out}
    assert "binarises quality.probabilities, but that is a probabilities output" in (
        reasons["from-probs"])

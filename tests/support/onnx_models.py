"""Tiny ONNX models built in code, and a writer for registry folders.

Each model genuinely computes something simple, so an executor test can check numbers:
- `green_threshold_segmenter`: mask = green channel > threshold (a "segmentation");
- `mean_colour_classifier`: softmax over a linear map of the mean R, G, B (a "classifier");
- `mask_fraction_measurement`: fraction of mask pixels that are set (a "measurement");
- `mask_centroid_detector`: centroid of a mask as normalised (x, y) (a "detection").
Opset 17 so ReduceMean takes `axes` as an attribute (PITFALLS.md).

`RegistryWriter` writes `<root>/<id>/<version>/{manifest.yaml, model.onnx, CARD.md}`; the
manifest helpers return plain dicts so a test can break one field at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime this project supports
BATCH: str | int = "N"


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dicomnode-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _image_input(name: str, size: tuple[int, int], channels: int, batch: str | int) -> Any:
    return helper.make_tensor_value_info(
        name, TensorProto.FLOAT, [batch, channels, size[0], size[1]]
    )


def green_threshold_segmenter(
    *,
    input_name: str = "image",
    output_name: str = "mask",
    size: tuple[int, int] = (32, 32),
    threshold: float = 0.5,
    batch: str | int = BATCH,
) -> onnx.ModelProto:
    """[N,3,H,W] RGB in 0..1 -> [N,1,H,W] float mask, 1 where green > threshold."""
    nodes = [
        helper.make_node("Slice", [input_name, "starts", "ends", "axes"], ["green"]),
        helper.make_node("Greater", ["green", "threshold"], ["above"]),
        helper.make_node("Cast", ["above"], [output_name], to=TensorProto.FLOAT),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "starts"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "ends"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array(threshold, dtype=np.float32), "threshold"),
    ]
    graph = helper.make_graph(
        nodes,
        "green_threshold",
        [_image_input(input_name, size, 3, batch)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, 1, *size])],
        inits,
    )
    return _model(graph)


def mean_colour_classifier(
    *,
    input_name: str = "image",
    output_name: str = "probabilities",
    size: tuple[int, int] = (32, 32),
    classes: int = 2,
    weights: Sequence[Sequence[float]] | None = None,
    bias: Sequence[float] | None = None,
    batch: str | int = BATCH,
) -> onnx.ModelProto:
    """[N,3,H,W] -> softmax(mean_rgb @ W + b), [N, classes].

    The default W makes the last class likelier the brighter the green channel is.
    """
    if weights is None:
        w = np.zeros((3, classes), dtype=np.float32)
        w[1, -1] = 8.0
        w[1, 0] = -8.0
    else:
        w = np.asarray(weights, dtype=np.float32)
    b = np.zeros(classes, dtype=np.float32) if bias is None else np.asarray(bias, np.float32)
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], axes=[2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [output_name], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mean_colour_classifier",
        [_image_input(input_name, size, 3, batch)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return _model(graph)


def mask_fraction_measurement(
    *,
    input_name: str = "mask",
    output_name: str = "fraction",
    size: tuple[int, int] = (32, 32),
    batch: str | int = BATCH,
) -> onnx.ModelProto:
    """[N,1,H,W] mask -> [N,1] mean of the mask (the fraction of pixels set)."""
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], [output_name], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mask_fraction",
        [_image_input(input_name, size, 1, batch)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, 1])],
    )
    return _model(graph)


def mask_centroid_detector(
    *,
    input_name: str = "mask",
    output_name: str = "centre",
    size: tuple[int, int] = (32, 32),
    batch: str | int = BATCH,
) -> onnx.ModelProto:
    """[N,1,H,W] mask -> [N,2] centroid (x, y) normalised to 0..1 (0.5, 0.5 when empty)."""
    h, w = size
    xs = ((np.arange(w, dtype=np.float32) + 0.5) / w).reshape(1, 1, 1, w)
    ys = ((np.arange(h, dtype=np.float32) + 0.5) / h).reshape(1, 1, h, 1)
    nodes = [
        helper.make_node("Mul", [input_name, "xs"], ["mx"]),
        helper.make_node("Mul", [input_name, "ys"], ["my"]),
        helper.make_node("ReduceSum", ["mx", "axes"], ["sx"], keepdims=0),
        helper.make_node("ReduceSum", ["my", "axes"], ["sy"], keepdims=0),
        helper.make_node("ReduceSum", [input_name, "axes"], ["count"], keepdims=0),
        helper.make_node("Add", ["count", "eps"], ["den"]),
        helper.make_node("Add", ["sx", "half_eps"], ["nx"]),
        helper.make_node("Add", ["sy", "half_eps"], ["ny"]),
        helper.make_node("Div", ["nx", "den"], ["cx"]),
        helper.make_node("Div", ["ny", "den"], ["cy"]),
        helper.make_node("Unsqueeze", ["cx", "one"], ["cx1"]),
        helper.make_node("Unsqueeze", ["cy", "one"], ["cy1"]),
        helper.make_node("Concat", ["cx1", "cy1"], [output_name], axis=1),
    ]
    inits = [
        numpy_helper.from_array(xs, "xs"),
        numpy_helper.from_array(ys, "ys"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "eps"),
        numpy_helper.from_array(np.array(0.5e-6, dtype=np.float32), "half_eps"),
    ]
    graph = helper.make_graph(
        nodes,
        "mask_centroid",
        [_image_input(input_name, size, 1, batch)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, 2])],
        inits,
    )
    return _model(graph)


def multi_head_classifier(
    heads: Sequence[tuple[str, Sequence[Sequence[float]], Sequence[float]]],
    *,
    input_name: str = "image",
    size: tuple[int, int] = (32, 32),
    batch: str | int = BATCH,
) -> onnx.ModelProto:
    """[N,3,H,W] -> one softmax(mean_rgb @ W + b) output per head (name, W [3, K], b [K])."""
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], axes=[2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"], axis=1),
    ]
    inits, outputs = [], []
    for name, weights, bias in heads:
        w = np.asarray(weights, dtype=np.float32)
        nodes += [
            helper.make_node("MatMul", ["flat", f"{name}_W"], [f"{name}_l0"]),
            helper.make_node("Add", [f"{name}_l0", f"{name}_B"], [f"{name}_l"]),
            helper.make_node("Softmax", [f"{name}_l"], [name], axis=1),
        ]
        inits += [numpy_helper.from_array(w, f"{name}_W"),
                  numpy_helper.from_array(np.asarray(bias, np.float32), f"{name}_B")]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                     [batch, w.shape[1]]))
    graph = helper.make_graph(nodes, "multi_head_classifier",
                              [_image_input(input_name, size, 3, batch)], outputs, inits)
    return _model(graph)


def channel_threshold_segmenter(
    masks: Sequence[tuple[str, int, float]],
    *,
    input_name: str = "image",
    size: tuple[int, int] = (32, 32),
    batch: str | int = BATCH,
) -> onnx.ModelProto:
    """[N,3,H,W] -> one [N,1,H,W] mask per (name, channel, threshold): channel > threshold."""
    nodes, inits, outputs = [], [], []
    for name, channel, threshold in masks:
        nodes += [
            helper.make_node("Slice", [input_name, f"{name}_s", f"{name}_e", f"{name}_a"],
                             [f"{name}_c"]),
            helper.make_node("Greater", [f"{name}_c", f"{name}_t"], [f"{name}_b"]),
            helper.make_node("Cast", [f"{name}_b"], [name], to=TensorProto.FLOAT),
        ]
        inits += [
            numpy_helper.from_array(np.array([channel], dtype=np.int64), f"{name}_s"),
            numpy_helper.from_array(np.array([channel + 1], dtype=np.int64), f"{name}_e"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), f"{name}_a"),
            numpy_helper.from_array(np.array(threshold, dtype=np.float32), f"{name}_t"),
        ]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 1, *size]))
    graph = helper.make_graph(nodes, "channel_threshold",
                              [_image_input(input_name, size, 3, batch)], outputs, inits)
    return _model(graph)


# --- manifests -------------------------------------------------------------------------------

PROVENANCE: dict[str, Any] = {
    "authors": ["dicomnode tests"],
    "training_data": "none: a fixed arithmetic graph built in code",
    "licence": "Apache-2.0",
    "intended_use": "tests only",
}


def private_code(value: str, meaning: str) -> dict[str, str]:
    return {"scheme": "99DICOMNODE", "value": value, "meaning": meaning}


def _base(
    model_id: str,
    version: str,
    task: str,
    *,
    modalities: Sequence[str],
    requires: Sequence[str],
    conflicts: Sequence[str],
) -> dict[str, Any]:
    return {
        "id": model_id,
        "version": version,
        "name": model_id.replace("-", " ").title(),
        "task": task,
        "modalities": list(modalities),
        "requires": list(requires),
        "conflicts": list(conflicts),
        "provenance": copy.deepcopy(PROVENANCE),
    }


def image_input(
    name: str = "image", size: tuple[int, int] = (32, 32), colour: str = "RGB"
) -> dict[str, Any]:
    return {
        "name": name,
        "layout": "NCHW",
        "size": list(size),
        "colour": colour,
        "normalisation": {"scale": 1 / 255, "mean": [0.0], "std": [1.0]},
        "dtype": "float32",
        "batch": "dynamic",
    }


def segmenter_manifest(
    model_id: str = "green-seg",
    version: str = "1.0.0",
    *,
    output: str = "mask",
    modalities: Sequence[str] = ("OP", "XC"),
    requires: Sequence[str] = (),
    conflicts: Sequence[str] = (),
    size: tuple[int, int] = (32, 32),
) -> dict[str, Any]:
    m = _base(
        model_id, version, "segmentation",
        modalities=modalities, requires=requires, conflicts=conflicts,
    )
    m["inputs"] = [image_input(size=size)]
    m["outputs"] = [
        {
            "kind": "mask",
            "name": output,
            "threshold": 0.5,
            "segment": {
                "label": "Bright green",
                "category": {
                    "scheme": "SCT", "value": "91723000", "meaning": "Anatomical structure"
                },
                "type": {"scheme": "SCT", "value": "36119006", "meaning": "Retinal vessel"},
            },
        }
    ]
    return m


def classifier_manifest(
    model_id: str = "green-quality",
    version: str = "1.0.0",
    *,
    output: str = "probabilities",
    gate: bool = True,
    modalities: Sequence[str] = ("OP", "XC"),
    requires: Sequence[str] = (),
    conflicts: Sequence[str] = (),
    size: tuple[int, int] = (32, 32),
) -> dict[str, Any]:
    m = _base(
        model_id, version, "classification",
        modalities=modalities, requires=requires, conflicts=conflicts,
    )
    m["inputs"] = [image_input(size=size)]
    out: dict[str, Any] = {
        "kind": "probabilities",
        "name": output,
        "concept": private_code("QUAL", "Image quality"),
        "classes": [
            {"label": "ungradable", "code": private_code("UNGR", "Ungradable")},
            {"label": "gradable", "code": private_code("GRAD", "Gradable")},
        ],
        "threshold": 0.5,
        "positive": "gradable",
    }
    if gate:
        out["gate"] = {"ineligible": ["ungradable"], "reason": "ungradable image"}
    m["outputs"] = [out]
    return m


def measurement_manifest(
    model_id: str = "mask-fraction",
    version: str = "1.0.0",
    *,
    source: str | Sequence[str] = "green-seg.mask",
    output: str = "fraction",
    modalities: Sequence[str] = ("OP", "XC"),
    requires: Sequence[str] = (),
    conflicts: Sequence[str] = (),
) -> dict[str, Any]:
    m = _base(
        model_id, version, "measurement",
        modalities=modalities, requires=requires, conflicts=conflicts,
    )
    m["inputs"] = [
        {"name": "mask", "from": source if isinstance(source, str) else list(source)}
    ]
    m["outputs"] = [
        {
            "kind": "measurement",
            "name": output,
            "code": private_code("FRAC", "Mask area fraction"),
            "unit": {"code": "1", "meaning": "no units"},
        }
    ]
    return m


def detector_manifest(
    model_id: str = "mask-centre",
    version: str = "1.0.0",
    *,
    source: str | Sequence[str] = "green-seg.mask",
    modalities: Sequence[str] = ("OP", "XC"),
    requires: Sequence[str] = (),
    conflicts: Sequence[str] = (),
) -> dict[str, Any]:
    m = _base(
        model_id, version, "detection",
        modalities=modalities, requires=requires, conflicts=conflicts,
    )
    m["inputs"] = [
        {"name": "mask", "from": source if isinstance(source, str) else list(source)}
    ]
    m["outputs"] = [
        {"kind": "point", "name": "centre", "code": private_code("CENT", "Mask centre")}
    ]
    return m


def model_for(manifest: dict[str, Any]) -> onnx.ModelProto:
    """The fixture graph matching a manifest made by the helpers above (by task)."""
    task = manifest["task"]
    first = manifest["inputs"][0]
    out = manifest["outputs"][0]["name"]
    size = tuple(first.get("size", (32, 32)))
    if task == "segmentation":
        return green_threshold_segmenter(input_name=first["name"], output_name=out, size=size)
    if task == "classification":
        classes = len(manifest["outputs"][0]["classes"])
        return mean_colour_classifier(
            input_name=first["name"], output_name=out, size=size, classes=classes
        )
    if task == "measurement":
        return mask_fraction_measurement(input_name=first["name"], output_name=out)
    return mask_centroid_detector(input_name=first["name"], output_name=out)


class RegistryWriter:
    """Writes model folders into a registry root (e.g. tmp_path / "model_registry")."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        manifest: dict[str, Any],
        model: onnx.ModelProto | bytes | None = None,
        *,
        card: str | None = "Test model card.\n",
        folder: tuple[str, str] | None = None,
    ) -> Path:
        """Write one model; `model=None` builds the matching fixture graph, bytes are written
        as they are (to test broken files). `folder` overrides <id>/<version>."""
        model_id, version = folder or (str(manifest["id"]), str(manifest["version"]))
        directory = self.root / model_id / version
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "manifest.yaml").write_text(
            yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8"
        )
        onnx_name = manifest.get("file", "model.onnx")
        if isinstance(model, bytes):
            (directory / onnx_name).write_bytes(model)
        else:
            onnx.save(model if model is not None else model_for(manifest), directory / onnx_name)
        if card is not None:
            (directory / "CARD.md").write_text(card, encoding="utf-8")
        return directory


def write_example_registry(root: Path) -> RegistryWriter:
    """A small coherent registry: a quality gate, two alternative segmenters, two consumers.

    green-quality (gate) <- green-seg, green-seg-alt (conflict with each other)
    mask-fraction takes from green-seg or green-seg-alt; mask-centre takes from green-seg.
    """
    writer = RegistryWriter(root)
    writer.add(classifier_manifest("green-quality"))
    writer.add(segmenter_manifest("green-seg", requires=["green-quality"],
                                  conflicts=["green-seg-alt"]))
    writer.add(segmenter_manifest("green-seg", "1.1.0", requires=["green-quality"],
                                  conflicts=["green-seg-alt"]))
    writer.add(segmenter_manifest("green-seg-alt", requires=["green-quality"],
                                  conflicts=["green-seg"]))
    writer.add(measurement_manifest("mask-fraction",
                                    source=["green-seg.mask", "green-seg-alt.mask"]))
    writer.add(detector_manifest("mask-centre", source="green-seg.mask", modalities=["OP"]))
    return writer

"""A Triton Inference Server model repository from the registry's ONNX models.

<dir>/<model-id>/config.pbtxt (platform onnxruntime_onnx) and <dir>/<model-id>/<n>/model.onnx.
Inputs and outputs, their types and dims come from the ONNX file itself. A model whose manifest
batch is "dynamic" (and whose ONNX batch dimension is symbolic) gets `max_batch_size` and dims
without the batch dimension, so Triton can batch; a fixed batch gets `max_batch_size: 0` and
the full shape. Each model is written under its id (the node's default remote name).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from dicomnode.errors import ManifestError
from dicomnode.registry.registry import ModelEntry

_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64", "int8": "TYPE_INT8",
    "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
}


@dataclass(frozen=True)
class Exported:
    model_id: str
    version_dir: Path
    config: Path


def _tensors(values: list[onnx.ValueInfoProto], key: str) -> list[tuple[str, str, list[int]]]:
    found = []
    for value in values:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        if dtype not in _TYPES:
            raise ManifestError(f"{key}: {value.name} has type {dtype}, not supported by Triton")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        found.append((value.name, _TYPES[dtype], dims))
    return found


def triton_config(entry: ModelEntry, max_batch: int) -> str:
    """config.pbtxt text for one model."""
    path = entry.onnx_path
    if path is None:
        raise ManifestError(f"{entry.key}: no ONNX file")
    model = onnx.load(str(path), load_external_data=False)
    initialisers = {i.name for i in model.graph.initializer}
    inputs = _tensors([v for v in model.graph.input if v.name not in initialisers], entry.key)
    outputs = _tensors(list(model.graph.output), entry.key)
    dynamic = (entry.manifest.tensor_inputs == [] or all(
        spec.batch == "dynamic" for spec in entry.manifest.tensor_inputs)) and all(
        dims and dims[0] == -1 for _, _, dims in inputs + outputs)
    lines = [f'name: "{entry.id}"', 'platform: "onnxruntime_onnx"',
             f"max_batch_size: {max_batch if dynamic else 0}"]
    for section, tensors in (("input", inputs), ("output", outputs)):
        items = []
        for name, kind, dims in tensors:
            shown = dims[1:] if dynamic else dims
            items.append(f'  {{\n    name: "{name}"\n    data_type: {kind}\n'
                         f"    dims: [ {', '.join(str(d) for d in shown)} ]\n  }}")
        lines.append(f"{section} [\n" + ",\n".join(items) + "\n]")
    if dynamic:
        lines.append("dynamic_batching { }")
    lines.append(
                 f'parameters: {{ key: "dicomnode_version" value: {{ string_value: '
                 f'"{entry.version}" }} }}')
    return "\n".join(lines) + "\n"


def export_triton(entries: list[ModelEntry], folder: Path, *, max_batch: int) -> list[Exported]:
    """Write the repository (one Triton version, 1, per model: the registry's version)."""
    done = []
    for entry in entries:
        if entry.onnx_path is None:
            raise ManifestError(f"{entry.key}: no ONNX file")
        model_dir = folder / entry.id
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry.onnx_path, version_dir / "model.onnx")
        config = model_dir / "config.pbtxt"
        config.write_text(triton_config(entry, max_batch))
        done.append(Exported(entry.id, version_dir, config))
    return done

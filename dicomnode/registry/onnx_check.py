"""Compare a manifest with the ONNX graph it describes: names, ranks, static sizes, types.

Reads the graph with `onnx` when installed (no session, nothing allocated); otherwise asks
ONNX Runtime for the signature through a throw-away CPU session, so a node without the `onnx`
package still checks its models. Running sessions is the executor's job, not the registry's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.registry.manifest import (
    BoxOutput,
    Manifest,
    MaskOutput,
    MeasurementOutput,
    PointOutput,
    ProbabilitiesOutput,
    TensorInput,
)

logger = logging.getLogger(__name__)

Dim = int | str | None  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True)
class TensorSignature:
    name: str
    dtype: str  # numpy name: float32, uint8, ...
    shape: tuple[Dim, ...] | None  # None: rank unknown


@dataclass(frozen=True)
class GraphSignature:
    inputs: dict[str, TensorSignature]
    outputs: dict[str, TensorSignature]


class OnnxCheckError(Exception):
    """The file does not open or does not match the manifest; the message says how."""


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
_FLOATS = {"float32", "float16", "float64"}


def read_signature(path: Path) -> GraphSignature:
    if not path.is_file():
        raise OnnxCheckError(f"ONNX file {path.name} is missing")
    try:
        import onnx
    except ImportError:  # onnx is a test extra; a node may run without it
        return _read_signature_ort(path)
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        raise OnnxCheckError(f"ONNX file {path.name} does not load: {_first_line(exc)}") from exc
    graph = model.graph
    initialisers = {init.name for init in graph.initializer}
    return GraphSignature(
        inputs={
            vi.name: _from_value_info(vi, onnx) for vi in graph.input if vi.name not in initialisers
        },
        outputs={vi.name: _from_value_info(vi, onnx) for vi in graph.output},
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _from_value_info(vi: Any, onnx: Any) -> TensorSignature:
    tensor_type = vi.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except Exception:  # an element type numpy has no name for
        dtype = f"onnx-type-{tensor_type.elem_type}"
    shape: tuple[Dim, ...] | None = None
    if tensor_type.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
    return TensorSignature(name=vi.name, dtype=dtype, shape=shape)


def _read_signature_ort(path: Path) -> GraphSignature:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxCheckError(f"ONNX file {path.name} does not load: {_first_line(exc)}") from exc

    def sig(arg: Any) -> TensorSignature:
        dims = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
        return TensorSignature(arg.name, _ORT_TYPES.get(arg.type, arg.type), dims)

    return GraphSignature(
        inputs={a.name: sig(a) for a in session.get_inputs()},
        outputs={a.name: sig(a) for a in session.get_outputs()},
    )


def check_against_manifest(manifest: Manifest, signature: GraphSignature) -> list[str]:
    """Every way the graph disagrees with the manifest; empty when they agree."""
    problems: list[str] = []
    declared = {spec.name for spec in manifest.inputs}
    for spec in manifest.inputs:
        found = signature.inputs.get(spec.name)
        if found is None:
            problems.append(
                f"input '{spec.name}' is not a graph input (graph inputs: "
                f"{sorted(signature.inputs)})"
            )
            continue
        if found.dtype != spec.dtype:
            problems.append(
                f"input '{spec.name}' is {found.dtype} in the graph, {spec.dtype} in the manifest"
            )
        if isinstance(spec, TensorInput):
            problems.extend(_check_tensor_input(spec, found))
    for name in sorted(set(signature.inputs) - declared):
        problems.append(f"graph input '{name}' is not declared in the manifest; nothing feeds it")
    for out in manifest.outputs:
        found = signature.outputs.get(out.name)
        if found is None:
            problems.append(
                f"output '{out.name}' is not a graph output (graph outputs: "
                f"{sorted(signature.outputs)})"
            )
            continue
        problems.extend(_check_output(out, found))
    return problems


def _fixed(dim: Dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _check_tensor_input(spec: TensorInput, found: TensorSignature) -> list[str]:
    if found.shape is None:
        return []
    if len(found.shape) != 4:
        return [f"input '{spec.name}' has rank {len(found.shape)}; layout {spec.layout} needs 4"]
    problems: list[str] = []
    axis = {"N": 0, **{letter: i for i, letter in enumerate(spec.layout)}}
    wanted = {"C": spec.channels, "H": spec.size[0], "W": spec.size[1]}
    for letter, value in wanted.items():
        dim = _fixed(found.shape[axis[letter]])
        if dim is not None and dim != value:
            problems.append(
                f"input '{spec.name}' has {letter}={dim} in the graph; the manifest says {value} "
                f"({'colour ' + spec.colour if letter == 'C' else 'size'})"
            )
    batch = _fixed(found.shape[0])
    if spec.batch == "dynamic" and batch is not None:
        problems.append(
            f"input '{spec.name}' has a fixed batch of {batch} in the graph; the manifest says "
            f"'dynamic' (write batch: {batch})"
        )
    if isinstance(spec.batch, int) and batch is not None and batch != spec.batch:
        problems.append(
            f"input '{spec.name}' has a batch of {batch} in the graph, {spec.batch} in the manifest"
        )
    return problems


def _check_output(
    out: ProbabilitiesOutput | MaskOutput | MeasurementOutput | PointOutput | BoxOutput,
    found: TensorSignature,
) -> list[str]:
    allowed = _FLOATS | ({"uint8", "bool"} if isinstance(out, MaskOutput) else set())
    problems: list[str] = []
    if found.dtype not in allowed:
        problems.append(
            f"output '{out.name}' ({out.kind}) is {found.dtype}; expected one of {sorted(allowed)}"
        )
    shape = found.shape
    if shape is None:
        return problems
    rank = len(shape)
    last = _fixed(shape[-1]) if shape else None
    if isinstance(out, ProbabilitiesOutput):
        if rank != 2:
            problems.append(f"output '{out.name}' has rank {rank}; probabilities are [N, classes]")
        elif last is not None and last != len(out.classes):
            problems.append(
                f"output '{out.name}' has {last} classes in the graph, {len(out.classes)} "
                "in the manifest"
            )
    elif isinstance(out, MaskOutput):
        if rank not in (3, 4):
            problems.append(f"output '{out.name}' has rank {rank}; a mask is [N,1,H,W] or [N,H,W]")
        elif rank == 4 and _fixed(shape[1]) not in (None, 1):
            problems.append(f"output '{out.name}' has {shape[1]} channels; a mask output has 1")
    elif isinstance(out, MeasurementOutput):
        if rank not in (1, 2) or (rank == 2 and last not in (None, 1)):
            problems.append(f"output '{out.name}' has shape {list(shape)}; expected [N] or [N, 1]")
    else:
        width = 2 if isinstance(out, PointOutput) else 4
        if rank != 2 or last not in (None, width):
            problems.append(
                f"output '{out.name}' has shape {list(shape)}; a {out.kind} is [N, {width}]"
            )
    return problems

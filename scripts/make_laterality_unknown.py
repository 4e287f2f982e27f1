"""Build laterality 1.1.0 from 1.0.0: the same cues, a disc-side rule for macula-centred
photographs, and an "unknown" answer where neither is sure.

    .venv/bin/python scripts/make_laterality_unknown.py [--confidence 0.95]

1.0.0's output `laterality` = [p(left), p(right)] (the macula and arcade cues around the
detected disc) is kept as the tensor `laterality_lr`; the detected disc centre (normalised x, y
of the 256 crop) as `laterality_disc_centre`. With dx = disc x - 0.5 (the crop is centred on
the field of view):
- |dx| >= FAR (0.21): the disc sits far to one side, as in a macula-centred photograph; the
  disc on the viewer's right means a right eye (the macula, at the centre, is to the viewer's
  left of the disc: 1.0.0's convention). p = 1 for that side.
- |dx| < NEAR (0.12): a disc-centred photograph; 1.0.0's cues decide.
- otherwise: neither kind; "unknown".
The new `laterality` = [p(left) * k, p(right) * k, 1 - k] with k = 1 when the chosen side's
probability is >= the confidence, else 0. FAR, NEAR and the confidence were chosen on the
tuning images (scripts/measure_laterality.py; see the card for what was looked at).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "model_registry" / "laterality" / "1.0.0" / "model.onnx"
TARGET = ROOT / "model_registry" / "laterality" / "1.1.0" / "model.onnx"
CONFIDENCE = 0.95  # chosen by scripts/measure_laterality.py on the tuning images
FAR = 0.21
NEAR = 0.12


def _disc_centre(graph: onnx.GraphProto) -> str:
    """The disc locator's centre: Concat(mx, my) / 256, the first Concat of the 1.0.0 graph."""
    concat = next(n for n in graph.node if n.op_type == "Concat")
    return str(next(n.output[0] for n in graph.node
                    if n.op_type == "Div" and n.input[0] == concat.output[0]))


def with_unknown(model: onnx.ModelProto, confidence: float, far: float = FAR,
                 near: float = NEAR) -> onnx.ModelProto:
    graph = model.graph
    for item in graph.node:
        item.output[:] = ["laterality_lr" if o == "laterality" else o for o in item.output]
    centre = _disc_centre(graph)

    def const(name: str, value: object, dtype: type = np.float32) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        graph.node.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def flag(op: str, inputs: list[str], output: str) -> str:
        return node("Cast", [node(op, inputs, f"{output}_b")], output, to=TensorProto.FLOAT)

    one = const("lat_one", 1.0)
    node("Identity", [centre], "laterality_disc_centre")
    x = node("Slice", [centre, const("lat_s0", [0], np.int64), const("lat_s1", [1], np.int64),
                       const("lat_ax", [1], np.int64)], "lat_disc_x")
    dx = node("Sub", [x, const("lat_half", 0.5)], "lat_dx")
    adx = node("Abs", [dx], "lat_adx")
    is_far = flag("GreaterOrEqual", [adx, const("lat_far", far)], "lat_far_f")
    is_near = flag("Less", [adx, const("lat_near", near)], "lat_near_f")
    disc_right = flag("Greater", [dx, const("lat_zero", 0.0)], "lat_disc_right")
    disc_left = node("Sub", [one, disc_right], "lat_disc_left")
    side = node("Concat", [disc_left, disc_right], "lat_side", axis=1)  # [N,2]
    chosen = node("Add", [node("Mul", [side, is_far], "lat_from_side"),
                          node("Mul", ["laterality_lr", is_near], "lat_from_cues")], "lat_p")
    top = node("ReduceMax", [chosen], "lat_top", axes=[1], keepdims=1)
    unknown = flag("Less", [top, const("lat_confidence", confidence)], "laterality_unknown")
    keep = node("Sub", [one, unknown], "lat_keep")
    node("Concat", [node("Mul", [chosen, keep], "lat_sides"), unknown], "laterality", axis=1)
    (old,) = [o for o in graph.output if o.name == "laterality"]
    batch = old.type.tensor_type.shape.dim[0]
    graph.output.remove(old)
    out = helper.make_tensor_value_info("laterality", TensorProto.FLOAT, [None, 3])
    out.type.tensor_type.shape.dim[0].CopyFrom(batch)
    graph.output.insert(0, out)
    model.producer_name = "dicomnode scripts/make_laterality_unknown.py"
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--confidence", type=float, default=CONFIDENCE)
    parser.add_argument("--far", type=float, default=FAR)
    parser.add_argument("--near", type=float, default=NEAR)
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(with_unknown(onnx.load(SOURCE), args.confidence, args.far, args.near), args.out)
    print(f"wrote {args.out} (disc side beyond {args.far}, cues within {args.near}, "
          f"unknown below {args.confidence})")


if __name__ == "__main__":
    main()

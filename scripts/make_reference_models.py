"""Write the hand-designed reference models as ONNX graphs (deterministic, no training, no data).

    .venv/bin/python scripts/make_reference_models.py [--registry model_registry]

Models (each `model_registry/<id>/1.0.0/model.onnx`; the manifests and cards sit beside them):

- optic-disc: the brightest compact region inside the field of view (local contrast of the
  smoothed luminance at 64x64, arg-max), then a mask of the bright pixels in a window around it
  (closed so vessels crossing the disc do not punch holes), its centroid and its diameter.
- laterality: the same disc locator, then two cues on which side of the disc the temporal
  retina lies: the macula (the darkest vessel-free spot beside the disc, relative to its
  surroundings) and the vessel arcades (a green-channel black top-hat vessel map: more vessel
  above and below the disc, less in the horizontal band beside it, on the temporal side). The
  two standardised side differences are added; temporal to the viewer's left of the disc means
  a right eye, as probabilities [left, right]. Independent of where the disc sits in the frame.
- fundus-quality: four soft checks (field-of-view coverage, illumination, contrast, sharpness),
  multiplied into p(gradable); outputs [gradable, ungradable] and the raw features.
- vessel-metrics: vessel density in the field of view (%) and mean vessel calibre
  (2 * area / boundary length, in pixels of the 768-pixel field-of-view crop).
- disc-metrics: disc area and equivalent diameter in pixels of the 256-pixel field-of-view crop,
  and the disc-to-field-of-view diameter ratio.

Every constant is written here; the figures they give are in each model's CARD.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

OPSET = 17
DISC_SIZE = 256  # optic-disc / laterality / quality input size
VESSEL_SIZE = 768  # the vessel models' output size

# fundus-quality checks: (feature index, centre, slope); p = prod(sigmoid(slope*(f - centre)))
# features: 0 FOV coverage of the crop, 1 mean luminance in FOV, 2 luminance std in FOV
# (contrast), 3 sharpness (mean |Laplacian| / mean luminance), 4 over-exposed fraction (negated)
QUALITY_CHECKS: tuple[tuple[int, float, float], ...] = (
    (0, 0.55, 40.0),
    (1, 0.14, 60.0),
    (2, 0.035, 150.0),
    (3, 0.030, 250.0),
    (4, -0.10, 60.0),
)


# laterality: the macula cue at 64x64 over the field-of-view crop. Everything below was chosen on
# CHASE_DB1 images 01-07 (both eyes) with the synthetic fundus as a check; 08-14 held out (see
# its CARD.md).
LATERALITY_DISC_CELLS = 6.25  # a typical disc diameter: 25 px of the 256 crop
LATERALITY_BAND = (1.5, 3.0)  # |dx| from the disc centre, in disc diameters
LATERALITY_HALF_HEIGHT = 1.5  # |dy| from the disc centre, in disc diameters
LATERALITY_EXCLUDE = 1.5  # disc radius left out of the background, in disc diameters
LATERALITY_ERODE = 5  # cells of field-of-view edge left out of the bands
LATERALITY_SCALES = tuple((s, w) for s in (3, 5, 7) for w in (21, 31, 41))  # (spot, background)
# The vessel-arcade cue, at 256x256: a black top-hat (grey closing minus image, LATERALITY_TOPHAT
# px) of the green channel is the vessel map; per side of the disc, its mean in the arcade boxes
# (above and below the disc) minus its mean in the horizontal band beside the disc. Regions in
# disc diameters (LATERALITY_DISC_CELLS * 4 px at 256): |dx| in LATERALITY_ARCADE_DX, |dy| in
# LATERALITY_ARCADE_DY for the arcades, |dy| <= LATERALITY_ARCADE_BAND for the band.
LATERALITY_TOPHAT = 9
LATERALITY_ARCADE_DX = (0.5, 3.5)
LATERALITY_ARCADE_DY = (1.5, 4.0)
LATERALITY_ARCADE_BAND = 1.0
# Each cue's side difference is divided by its root mean square over CHASE_DB1 01-07 (the only
# fitted numbers), the two are added and p(right) = sigmoid(LATERALITY_SLOPE * sum); the slope
# is set by hand (the 0.5 threshold, i.e. a sum of 0, does not depend on it).
LATERALITY_MACULA_SCALE = 0.137
LATERALITY_ARCADE_SCALE = 0.0145
LATERALITY_SLOPE = 2.0


class _Graph:
    """A small helper that names nodes and constants uniquely."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, value: object, dtype: type = np.float32) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        output = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def avg(self, x: str, k: int, stride: int = 1) -> str:
        pad = (k - 1) // 2 if stride == 1 else 0
        return self.op("AveragePool", [x], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad, pad, pad, pad], count_include_pad=0)

    def maxpool(self, x: str, k: int) -> str:
        pad = (k - 1) // 2
        return self.op("MaxPool", [x], kernel_shape=[k, k], pads=[pad, pad, pad, pad])

    def erode(self, x: str, k: int) -> str:
        neg = self.op("Neg", [x])
        return self.op("Neg", [self.maxpool(neg, k)])

    def dilate(self, x: str, k: int) -> str:
        return self.maxpool(x, k)

    def sum_hw(self, x: str) -> str:  # (N,1,H,W) -> (N,1)
        axes = self.const([2, 3], np.int64)
        return self.op("ReduceSum", [x, axes], keepdims=0)

    def mean_hw(self, x: str) -> str:
        return self.op("ReduceMean", [x], axes=[2, 3], keepdims=0)  # attribute up to opset 17


def _luminance(g: _Graph, image: str) -> str:
    weights = g.const(np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1))
    return g.op("Conv", [image, weights])


def _fov(g: _Graph, image: str) -> str:
    """1 where the brightest channel exceeds 0.06 (the camera's dark surround is below)."""
    brightest = g.op("ReduceMax", [image], axes=[1], keepdims=1)
    return g.op("Cast", [g.op("Greater", [brightest, g.const(0.06)])], to=TensorProto.FLOAT)


def _grid(g: _Graph, size: int, scale: float) -> tuple[str, str]:
    """Column (1,1,1,size) and row (1,1,size,1) coordinates, (index + 0.5) * scale."""
    line = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(scale)
    xs = g.const(line.reshape(1, 1, 1, size))  # broadcasts against (N,1,size,size)
    ys = g.const(line.reshape(1, 1, size, 1))
    return xs, ys


def _disc_locator(g: _Graph, image: str) -> tuple[str, str, str]:
    """(mask (N,1,S,S) in 0..1, centre (N,2) normalised x,y, diameter (N,1) in pixels)."""
    lum = _luminance(g, image)
    fov = _fov(g, image)
    # Detection at 64x64: disc-sized smoothing minus a wide local background, inside the FOV
    # shrunk by a margin so the bright rim of the aperture never wins.
    lum64 = g.avg(lum, 4, 4)
    fov64 = g.avg(fov, 4, 4)
    inner = g.op("Cast", [g.op("Greater", [g.erode(fov64, 9), g.const(0.99)])],
                 to=TensorProto.FLOAT)
    blob = g.avg(lum64, 7)
    background = g.avg(lum64, 31)
    score = g.op("Sub", [blob, background])
    # outside the inner FOV: pushed far below any real score
    score = g.op("Add", [g.op("Mul", [score, inner]),
                         g.op("Mul", [g.op("Sub", [g.const(1.0), inner]), g.const(-10.0)])])
    flat = g.op("Flatten", [score], axis=1)
    index = g.op("ArgMax", [flat], axis=1, keepdims=1)  # (N,1) int64
    row = g.op("Div", [index, g.const(64, np.int64)])
    col = g.op("Mod", [index, g.const(64, np.int64)])
    to_px = 4.0
    cx = g.op("Mul", [g.op("Add", [g.op("Cast", [col], to=TensorProto.FLOAT), g.const(0.5)]),
                      g.const(to_px)])
    cy = g.op("Mul", [g.op("Add", [g.op("Cast", [row], to=TensorProto.FLOAT), g.const(0.5)]),
                      g.const(to_px)])
    # Segmentation at full size in a window around the detected centre.
    xs, ys = _grid(g, DISC_SIZE, 1.0)
    shape4 = g.const([-1, 1, 1, 1], np.int64)
    cx4 = g.op("Reshape", [cx, shape4])
    cy4 = g.op("Reshape", [cy, shape4])
    dx = g.op("Sub", [xs, cx4])
    dy = g.op("Sub", [ys, cy4])
    d2 = g.op("Add", [g.op("Mul", [dx, dx]), g.op("Mul", [dy, dy])])
    window_r = 0.13 * DISC_SIZE
    window = g.op("Cast", [g.op("Less", [d2, g.const(window_r * window_r)])], to=TensorProto.FLOAT)
    window = g.op("Mul", [window, fov])
    # Close vessels (dark, thin) out of the luminance first, then smooth.
    closed = g.erode(g.dilate(lum, 9), 9)
    smooth = g.avg(closed, 5)
    in_win = g.op("Mul", [smooth, window])
    peak = g.op("ReduceMax", [in_win], axes=[2, 3], keepdims=1)
    wsum = g.op("ReduceSum", [window, g.const([2, 3], np.int64)], keepdims=1)
    wmean = g.op("Div", [g.op("ReduceSum", [in_win, g.const([2, 3], np.int64)], keepdims=1),
                         g.op("Max", [wsum, g.const(1.0)])])
    level = g.op("Add", [wmean, g.op("Mul", [g.op("Sub", [peak, wmean]), g.const(0.5)])])
    soft = g.op("Sigmoid", [g.op("Mul", [g.op("Sub", [smooth, level]), g.const(60.0)])])
    mask = g.op("Mul", [soft, window])
    # centroid and equivalent diameter of the binary mask
    binary = g.op("Cast", [g.op("GreaterOrEqual", [mask, g.const(0.5)])], to=TensorProto.FLOAT)
    area = g.sum_hw(binary)  # (N,1)
    safe = g.op("Max", [area, g.const(1.0)])
    mx = g.op("Div", [g.sum_hw(g.op("Mul", [binary, xs])), safe])
    my = g.op("Div", [g.sum_hw(g.op("Mul", [binary, ys])), safe])
    centre = g.op("Div", [g.op("Concat", [mx, my], axis=1), g.const(float(DISC_SIZE))])
    diameter = g.op("Mul", [g.op("Sqrt", [g.op("Div", [area, g.const(np.pi)])]), g.const(2.0)])
    return mask, centre, diameter


def _image_input(size: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])


def _model(g: _Graph, name: str, inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dicomnode scripts/make_reference_models.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def optic_disc() -> onnx.ModelProto:
    g = _Graph()
    mask, centre, diameter = _disc_locator(g, "image")
    g.op("Identity", [mask], "disc_probability")
    g.op("Identity", [centre], "disc_centre")
    g.op("Identity", [diameter], "disc_diameter")
    outs = [
        helper.make_tensor_value_info("disc_probability", TensorProto.FLOAT,
                                      ["batch", 1, DISC_SIZE, DISC_SIZE]),
        helper.make_tensor_value_info("disc_centre", TensorProto.FLOAT, ["batch", 2]),
        helper.make_tensor_value_info("disc_diameter", TensorProto.FLOAT, ["batch", 1]),
    ]
    return _model(g, "optic_disc", [_image_input(DISC_SIZE)], outs)


def _laterality_macula(g: _Graph, centre: str) -> str:
    """(N,1) darkest-spot difference, right band minus left band (> 0: macula left, right eye).

    At 64x64 the vessel-free luminance (vessels closed out) is divided by its local background
    (disc excluded, so it does not brighten its surroundings); the darkest spot in each of two
    horizontal bands, LATERALITY_BAND disc diameters to the left and to the right of the disc, is
    found, and the difference is averaged over LATERALITY_SCALES.
    """
    lum = _luminance(g, "image")
    fov = _fov(g, "image")
    closed = g.erode(g.dilate(lum, 9), 9)
    l64 = g.avg(g.op("Mul", [closed, fov]), 4, 4)
    f64 = g.avg(fov, 4, 4)
    inner = g.erode(g.op("Cast", [g.op("Greater", [f64, g.const(0.99)])], to=TensorProto.FLOAT),
                    LATERALITY_ERODE)
    edge = (LATERALITY_ERODE - 1) // 2  # the crop's border counts as outside the field of view
    border = np.zeros((1, 1, 64, 64), np.float32)
    border[..., edge:64 - edge, edge:64 - edge] = 1.0
    inner = g.op("Mul", [inner, g.const(border)])
    dx, dy = _disc_offsets(g, centre, 64)
    adx = g.op("Abs", [dx])
    dd = LATERALITY_DISC_CELLS
    d2 = g.op("Add", [g.op("Mul", [dx, dx]), g.op("Mul", [dy, dy])])
    keep = g.op("Cast", [g.op("Greater", [d2, g.const((LATERALITY_EXCLUDE * dd) ** 2)])],
                to=TensorProto.FLOAT)  # the background leaves the disc out

    def flag(cond: str) -> str:
        return g.op("Cast", [cond], to=TensorProto.FLOAT)

    lo, hi = LATERALITY_BAND
    band = g.op("Mul", [flag(g.op("LessOrEqual", [g.op("Abs", [dy]),
                                                   g.const(LATERALITY_HALF_HEIGHT * dd)])),
                        g.op("Mul", [flag(g.op("GreaterOrEqual", [adx, g.const(lo * dd)])),
                                     flag(g.op("LessOrEqual", [adx, g.const(hi * dd)]))])])
    band = g.op("Mul", [band, inner])
    left = g.op("Mul", [band, flag(g.op("Less", [dx, g.const(0.0)]))])
    right = g.op("Mul", [band, flag(g.op("Greater", [dx, g.const(0.0)]))])

    def band_min(score: str, where: str) -> str:  # (N,1); 2.0 where the band is empty
        outside = g.op("Mul", [g.op("Sub", [g.const(1.0), where]), g.const(2.0)])
        return g.op("ReduceMin", [g.op("Add", [g.op("Mul", [score, where]), outside])],
                    axes=[2, 3], keepdims=0)

    diffs = []
    lw = g.op("Mul", [l64, keep])
    fw = g.op("Mul", [f64, keep])
    for spot, wide in LATERALITY_SCALES:
        bg = g.op("Div", [g.avg(lw, wide), g.op("Max", [g.avg(fw, wide), g.const(1e-3)])])
        sp = g.op("Div", [g.avg(l64, spot), g.op("Max", [g.avg(f64, spot), g.const(1e-3)])])
        score = g.op("Div", [sp, g.op("Max", [bg, g.const(1e-3)])])
        diffs.append(g.op("Sub", [band_min(score, right), band_min(score, left)]))
    total = diffs[0]
    for d in diffs[1:]:
        total = g.op("Add", [total, d])
    return g.op("Div", [total, g.const(float(len(diffs)))], "laterality_macula")


def _disc_offsets(g: _Graph, centre: str, size: int) -> tuple[str, str]:
    """Column and row offsets from the disc centre, in cells of a size x size grid."""
    xs, ys = _grid(g, size, 1.0)
    c = g.op("Mul", [centre, g.const(float(size))])
    shape4 = g.const([-1, 1, 1, 1], np.int64)
    cx4 = g.op("Reshape", [g.op("Slice", [c, g.const([0], np.int64), g.const([1], np.int64),
                                          g.const([1], np.int64)]), shape4])
    cy4 = g.op("Reshape", [g.op("Slice", [c, g.const([1], np.int64), g.const([2], np.int64),
                                          g.const([1], np.int64)]), shape4])
    return g.op("Sub", [xs, cx4]), g.op("Sub", [ys, cy4])


def _laterality_arcade(g: _Graph, centre: str) -> str:
    """(N,1) vessel-arcade difference, left side minus right side (> 0: temporal left, right eye).

    The vessel map is a black top-hat of the green channel at 256x256 (grey closing minus the
    image: dark, thin structures), inside the field of view shrunk by 9 px. On each side of the
    disc the temporal pattern scores high: much vessel in the arcade boxes above and below the
    disc (|dy| in LATERALITY_ARCADE_DY), little in the horizontal band beside it
    (|dy| <= LATERALITY_ARCADE_BAND), both |dx| in LATERALITY_ARCADE_DX disc diameters.
    """
    start, stop, axis = (g.const([k], np.int64) for k in (1, 2, 1))
    green = g.op("Slice", ["image", start, stop, axis])
    k = LATERALITY_TOPHAT
    tophat = g.op("Sub", [g.erode(g.dilate(green, k), k), green])
    inner = g.erode(_fov(g, "image"), 9)
    vessels = g.op("Mul", [tophat, inner])
    dx, dy = _disc_offsets(g, centre, DISC_SIZE)
    dd = LATERALITY_DISC_CELLS * DISC_SIZE / 64.0
    adx = g.op("Abs", [dx])
    ady = g.op("Abs", [dy])

    def flag(cond: str) -> str:
        return g.op("Cast", [cond], to=TensorProto.FLOAT)

    def within(value: str, lo: float, hi: float) -> str:
        return g.op("Mul", [flag(g.op("GreaterOrEqual", [value, g.const(lo * dd)])),
                            flag(g.op("LessOrEqual", [value, g.const(hi * dd)]))])

    columns = g.op("Mul", [within(adx, *LATERALITY_ARCADE_DX), inner])
    arcade_rows = within(ady, *LATERALITY_ARCADE_DY)
    band_rows = flag(g.op("LessOrEqual", [ady, g.const(LATERALITY_ARCADE_BAND * dd)]))

    def mean_in(where: str) -> str:  # (N,1); 0 where the region is empty
        return g.op("Div", [g.sum_hw(g.op("Mul", [vessels, where])),
                            g.op("Max", [g.sum_hw(where), g.const(1.0)])])

    def temporal_score(side: str) -> str:  # arcades minus band on one side
        cols = g.op("Mul", [columns, flag(g.op(side, [dx, g.const(0.0)]))])
        return g.op("Sub", [mean_in(g.op("Mul", [cols, arcade_rows])),
                            mean_in(g.op("Mul", [cols, band_rows]))])

    return g.op("Sub", [temporal_score("Less"), temporal_score("Greater")], "laterality_arcade")


def laterality() -> onnx.ModelProto:
    """Which side of the disc the temporal retina lies on, not where the disc sits in the frame.

    Two cues around the detected disc, each a side difference that is positive when the temporal
    side is to the viewer's left of the disc (a right eye): the macula (`_laterality_macula`, the
    darker band beside the disc) and the vessel arcades (`_laterality_arcade`). Each is divided by
    its scale (LATERALITY_MACULA_SCALE, LATERALITY_ARCADE_SCALE), the two are added and
    p(right) = sigmoid(LATERALITY_SLOPE * sum). The raw cues stay in the graph as the tensors
    `laterality_macula` and `laterality_arcade` (not graph outputs) for measurement.
    """
    g = _Graph()
    _, centre, _ = _disc_locator(g, "image")
    macula = g.op("Div", [_laterality_macula(g, centre), g.const(LATERALITY_MACULA_SCALE)])
    arcade = g.op("Div", [_laterality_arcade(g, centre), g.const(LATERALITY_ARCADE_SCALE)])
    total = g.op("Add", [macula, arcade])
    p_right = g.op("Sigmoid", [g.op("Mul", [total, g.const(LATERALITY_SLOPE)])])
    p_left = g.op("Sub", [g.const(1.0), p_right])
    g.op("Concat", [p_left, p_right], "laterality", axis=1)
    outs = [helper.make_tensor_value_info("laterality", TensorProto.FLOAT, ["batch", 2])]
    return _model(g, "laterality", [_image_input(DISC_SIZE)], outs)


def fundus_quality() -> onnx.ModelProto:
    g = _Graph()
    lum = _luminance(g, "image")
    fov = _fov(g, "image")
    coverage = g.mean_hw(fov)  # (N,1); a full circle in its square covers 0.785
    inner = g.erode(fov, 9)
    n_in = g.op("Max", [g.sum_hw(inner), g.const(1.0)])
    mean = g.op("Div", [g.sum_hw(g.op("Mul", [lum, inner])), n_in])
    mean4 = g.op("Reshape", [mean, g.const([-1, 1, 1, 1], np.int64)])
    dev = g.op("Mul", [g.op("Sub", [lum, mean4]), inner])
    std = g.op("Sqrt", [g.op("Div", [g.sum_hw(g.op("Mul", [dev, dev])), n_in])])
    lap_k = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32).reshape(1, 1, 3, 3)
    lap = g.op("Abs", [g.op("Conv", ["image_green", g.const(lap_k)], pads=[1, 1, 1, 1])])
    g.nodes.insert(0, helper.make_node("Slice", ["image", "g_start", "g_end", "g_axis"],
                                       ["image_green"]))
    g.inits += [numpy_helper.from_array(np.array([1], np.int64), "g_start"),
                numpy_helper.from_array(np.array([2], np.int64), "g_end"),
                numpy_helper.from_array(np.array([1], np.int64), "g_axis")]
    sharp_raw = g.op("Div", [g.sum_hw(g.op("Mul", [lap, inner])), n_in])
    sharp = g.op("Div", [sharp_raw, g.op("Max", [mean, g.const(0.02)])])
    bright = g.op("Cast", [g.op("Greater", [lum, g.const(0.92)])], to=TensorProto.FLOAT)
    over = g.op("Neg", [g.op("Div", [g.sum_hw(g.op("Mul", [bright, inner])), n_in])])
    feats = g.op("Concat", [coverage, mean, std, sharp, over], "quality_features", axis=1)
    p = None
    for index, centre, slope in QUALITY_CHECKS:
        f = g.op("Slice", [feats, g.const([index], np.int64), g.const([index + 1], np.int64),
                           g.const([1], np.int64)])
        c = g.op("Sigmoid", [g.op("Mul", [g.op("Sub", [f, g.const(centre)]), g.const(slope)])])
        p = c if p is None else g.op("Mul", [p, c])
    assert p is not None
    g.op("Concat", [p, g.op("Sub", [g.const(1.0), p])], "quality", axis=1)
    outs = [helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("quality_features", TensorProto.FLOAT, ["batch", 5])]
    return _model(g, "fundus_quality", [_image_input(DISC_SIZE)], outs)


def vessel_metrics() -> onnx.ModelProto:
    g = _Graph()
    mask = g.op("Cast", [g.op("GreaterOrEqual", ["vessel_probability", g.const(0.5)])],
                to=TensorProto.FLOAT)
    # the field of view: the circle inscribed in the square crop the vessel model saw
    xs, ys = _grid(g, VESSEL_SIZE, 1.0)
    half = VESSEL_SIZE / 2.0
    dx = g.op("Sub", [xs, g.const(half)])
    dy = g.op("Sub", [ys, g.const(half)])
    d2 = g.op("Add", [g.op("Mul", [dx, dx]), g.op("Mul", [dy, dy])])
    fov = g.op("Cast", [g.op("LessOrEqual", [d2, g.const(half * half)])], to=TensorProto.FLOAT)
    inside = g.op("Mul", [mask, fov])
    area = g.sum_hw(inside)
    density = g.op("Mul", [g.op("Div", [area, g.sum_hw(fov)]), g.const(100.0)])
    boundary = g.op("Sub", [inside, g.erode(inside, 3)])
    calibre = g.op("Div", [g.op("Mul", [area, g.const(2.0)]),
                           g.op("Max", [g.sum_hw(boundary), g.const(1.0)])])
    g.op("Identity", [density], "vessel_density")
    g.op("Identity", [calibre], "vessel_calibre")
    inp = helper.make_tensor_value_info("vessel_probability", TensorProto.FLOAT,
                                        ["batch", 1, VESSEL_SIZE, VESSEL_SIZE])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 1])
            for n in ("vessel_density", "vessel_calibre")]
    return _model(g, "vessel_metrics", [inp], outs)


def disc_metrics() -> onnx.ModelProto:
    g = _Graph()
    mask = g.op("Cast", [g.op("GreaterOrEqual", ["disc_probability", g.const(0.5)])],
                to=TensorProto.FLOAT)
    area = g.sum_hw(mask)
    diameter = g.op("Mul", [g.op("Sqrt", [g.op("Div", [area, g.const(np.pi)])]), g.const(2.0)])
    g.op("Identity", [area], "disc_area")
    g.op("Identity", [diameter], "disc_diameter")
    g.op("Div", [diameter, g.const(float(DISC_SIZE))], "disc_fov_ratio")
    inp = helper.make_tensor_value_info("disc_probability", TensorProto.FLOAT,
                                        ["batch", 1, DISC_SIZE, DISC_SIZE])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 1])
            for n in ("disc_area", "disc_diameter", "disc_fov_ratio")]
    return _model(g, "disc_metrics", [inp], outs)


BUILDERS = {
    "optic-disc": optic_disc,
    "laterality": laterality,
    "fundus-quality": fundus_quality,
    "vessel-metrics": vessel_metrics,
    "disc-metrics": disc_metrics,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path,
                        default=Path(__file__).resolve().parent.parent / "model_registry")
    parser.add_argument("--only", nargs="*", choices=sorted(BUILDERS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for model_id in args.only or sorted(BUILDERS):
        folder = args.registry / model_id / "1.0.0"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        onnx.save(BUILDERS[model_id](), str(path))
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)


if __name__ == "__main__":
    main()

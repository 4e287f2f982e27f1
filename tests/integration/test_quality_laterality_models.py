"""The shipped fundus-quality 2.0.0 and laterality 1.1.0 on images made in code (and the NEMA
non-fundus photographs where ../shared/data is present), run as the node runs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter

from dicomnode.graph import Selection, resolve
from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.postprocess import classify
from dicomnode.inference.preprocess import SourceImage, prepare
from dicomnode.registry import Registry, load_registry
from dicomnode.registry.manifest import ProbabilitiesOutput
from dicomnode.synthetic import synthetic_fundus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NEMA = ROOT.parent / "shared" / "data" / "dicom-samples" / "NEMA_WG04"


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = load_registry(ROOT / "model_registry")
    assert not reg.left_out, reg.left_out
    return reg


def _label(registry: Registry, model: str, rgb: NDArray[np.uint8]) -> str:
    entry = registry.get(model)
    spec = entry.manifest.tensor_inputs[0]
    output = entry.manifest.outputs[0]
    assert isinstance(output, ProbabilitiesOutput)
    session = ort.InferenceSession(str(entry.onnx_path), providers=["CPUExecutionProvider"])
    tensor, _ = prepare(SourceImage("1.2.3", rgb), spec)
    values = session.run([output.name], {spec.name: tensor[None]})[0][0]
    return classify(np.asarray(values), output).label


def test_latest_versions_and_gating(registry: Registry) -> None:
    assert registry.get("fundus-quality").manifest.version == "2.0.0"
    assert registry.get("laterality").manifest.version == "1.1.0"
    assert registry.get("laterality", "1.0.0").manifest.requires == []  # the old one is kept
    graph = resolve(Selection.of(["laterality"], modality="OP"), registry)
    assert graph.stages == (("fundus-quality",), ("laterality",))


def _bright_spot(offset: float) -> NDArray[np.uint8]:
    """An even orange field of view with one disc-like bright spot `offset` of the field's
    diameter right of its centre: the disc locator finds it there, and nothing else."""
    size = 512
    yy, xx = np.mgrid[0:size, 0:size]
    centre, radius = size / 2, size * 0.48
    rgb = np.zeros((size, size, 3), np.float32)
    inside = np.hypot(yy - centre, xx - centre) <= radius
    rgb[inside] = (170, 70, 25)
    spot_x = centre + offset * 2 * radius
    spot = np.exp(-((yy - centre) ** 2 + (xx - spot_x) ** 2) / (2 * (size * 0.03) ** 2))
    rgb += spot[..., None] * np.array([80, 150, 120]) * inside[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("offset", "expected"), [
    (0.30, "right"), (-0.30, "left"),  # macula-centred: the disc's side tells the eye
    (0.16, "unknown"), (-0.16, "unknown"),  # neither disc- nor macula-centred
    (0.0, "unknown"),  # disc-centred but nothing around it: the cues are not sure
])
def test_laterality_says_unknown_rather_than_guess(registry: Registry, offset: float,
                                                    expected: str) -> None:
    assert _label(registry, "laterality", _bright_spot(offset)) == expected


@pytest.mark.parametrize("side", ["R", "L"])
def test_laterality_on_the_synthetic_fundus(registry: Registry, side: str) -> None:
    rgb = synthetic_fundus(512, side, seed=11)  # type: ignore[arg-type]
    assert _label(registry, "laterality", rgb) == ("right" if side == "R" else "left")


def _document() -> NDArray[np.uint8]:
    page = Image.new("RGB", (700, 900), (246, 244, 238))
    draw = ImageDraw.Draw(page)
    rng = np.random.default_rng(5)
    for y in range(60, 860, 24):
        x = 60
        while x < 620:
            width = int(rng.integers(20, 80))
            draw.rectangle([x, y, x + width, y + 9], fill=(30, 30, 30))
            x += width + 10
    return np.array(page)


def test_fundus_quality_three_outcomes_on_images_made_in_code(registry: Registry) -> None:
    rgb = synthetic_fundus(768, "R", seed=150)
    assert _label(registry, "fundus-quality", rgb) == "gradable"
    dark = np.clip(255 * (rgb / 255.0) ** 2.0, 0, 255).astype(np.uint8)  # darker, still sharp
    assert _label(registry, "fundus-quality", dark) == "gradable"
    blurred = np.array(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(10)))
    assert _label(registry, "fundus-quality", blurred) == "ungradable"
    assert _label(registry, "fundus-quality", _document()) == "not-fundus"
    grey = np.full((600, 800, 3), 128, np.uint8)  # a flat field: stopped, as either (card)
    assert _label(registry, "fundus-quality", grey) in ("ungradable", "not-fundus")


@pytest.mark.parametrize("name", ["J2KI/VL1_J2KI", "J2KI/VL2_J2KI", "J2KI/VL3_J2KI",
                                  "J2KI/VL6_J2KI", "RLE/VL1_RLE", "RLE/VL2_RLE", "RLE/VL3_RLE",
                                  "RLE/VL6_RLE"])
def test_every_nema_non_fundus_photograph_is_refused(registry: Registry, name: str) -> None:
    path = NEMA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not part of the project)")
    rgb: Any = decode_rgb(pydicom.dcmread(path))
    assert _label(registry, "fundus-quality", rgb) == "not-fundus"


def test_the_nema_fundus_photograph_is_gradable(registry: Registry) -> None:
    path = NEMA / "J2KI" / "VL4_J2KI"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not part of the project)")
    assert _label(registry, "fundus-quality", decode_rgb(pydicom.dcmread(path))) == "gradable"

"""The shipped registry and presets: every model passes the checks, the four presets resolve,
and the models give plausible answers on the synthetic fundus (and a real CHASE_DB1 image when
../shared/data is present) when run through the real executor."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from dicomnode.graph import Selection, resolve
from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.executor import GraphExecutor
from dicomnode.inference.outputs import write_outputs
from dicomnode.inference.postprocess import mask_to_source, measured_values, point_to_source
from dicomnode.inference.preprocess import SourceImage
from dicomnode.registry import Registry
from dicomnode.registry.manifest import MaskOutput, MeasurementOutput, PointOutput
from dicomnode.results.job_outputs import results_from_outputs
from dicomnode.routing import load_presets
from dicomnode.settings import load_settings
from dicomnode.synthetic import demo_study, synthetic_fundus_with_truth
from tests.support.graphs import run_graph
from tests.support.peers import unavailable

ROOT = Path(__file__).resolve().parents[2]
CHASE = ROOT.parent / "shared" / "data" / "CHASE_DB1"
PRESETS = ("diabetic-screening", "ophthalmology-comprehensive", "glaucoma-clinic",
           "vascular-health-check")
SHIPPED = ("disc-metrics", "dme-risk", "dr-grade", "fundus-quality", "laterality", "lesion-seg",
           "optic-disc", "vessel-metrics", "vessel-seg", "vessel-seg-classic")
SIZE = 512
# Measured on seeds 0-5, both eyes (scripts/measure_reference_models.py): centre error < 1.2 px,
# disc mask Dice >= 0.91. The bounds below leave a margin, and still fail a misplaced disc.
DISC_CENTRE_TOLERANCE_PX = 4.0
DISC_DICE_MIN = 0.8
# Measured on seeds 0-2, both eyes: vessel-seg Dice 0.81-0.83, vessel-seg-classic 0.78-0.80.
VESSEL_DICE_MIN = {"vessel-seg": 0.7, "vessel-seg-classic": 0.65}
SPACING = (0.012, 0.012)  # mm per pixel: a 512-px synthetic image over about 6 mm of retina


def _dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_shipped_registry_passes_its_checks(registry: Registry) -> None:
    assert not registry.left_out, registry.left_out
    for model_id in SHIPPED:
        entry = registry.get(model_id)
        assert entry.card_path is not None and entry.card_path.is_file()
        assert entry.onnx_path is not None
        assert entry.onnx_path.stat().st_size < 8 * 1024 * 1024


def test_the_four_presets_load_and_resolve(registry: Registry) -> None:
    settings = load_settings(ROOT / "config" / "dicomnode.yaml")
    presets = load_presets(settings.presets.path, registry=registry,
                           destinations=set(settings.destinations))
    assert not presets.problems, presets.problems
    loaded = {p.id: p for p in presets.ordered()}
    assert set(PRESETS) <= set(loaded)
    assert settings.modality_defaults.get("OP") in loaded
    for preset_id in PRESETS:
        preset = loaded[preset_id]
        assert preset.destinations == ["pacs"]
        graph = resolve(Selection.of(preset.models, modality="OP", preset=preset_id), registry)
        assert graph.stages[0][0] == "fundus-quality"  # the gate runs first
    comprehensive = loaded["ophthalmology-comprehensive"]
    classic = resolve(Selection.of(comprehensive.models, with_models=["vessel-seg-classic"],
                                   without=["vessel-seg"], modality="OP"), registry)
    assert classic.inputs["vessel-metrics"]["vessel_probability"] == (
        "vessel-seg-classic.vessel_probability")


@pytest.mark.parametrize("side", ["L", "R"])
def test_disc_quality_and_laterality_on_synthetic(executor: GraphExecutor, registry: Registry,
                                                  side: str) -> None:
    rgb, truth = synthetic_fundus_with_truth(SIZE, side, seed=3)  # type: ignore[arg-type]
    image = SourceImage("1.2.826.0.1.3680043.10.1", rgb, pixel_spacing=SPACING)
    # optic-disc 1.0.0, the hand-designed locator, is exact on this synthetic fundus (the
    # learned 2.0.0 is checked on real IDRiD discs in test_idrid_models.py); pinning it also
    # checks that disc-metrics follows a pinned optic-disc version
    result = run_graph(executor, registry,
                  ["fundus-quality", "laterality", "optic-disc@1.0.0", "disc-metrics"], [image])
    uid = image.sop_instance_uid
    assert result.models["fundus-quality"].findings["quality"][uid].label == "gradable"
    assert result.models["laterality"].findings["laterality"][uid].label == (
        "right" if side == "R" else "left")
    disc = result.models["optic-disc"]
    manifest = registry.get("optic-disc", "1.0.0").manifest
    centre_spec = next(o for o in manifest.outputs if o.name == "disc_centre")
    mask_spec = next(o for o in manifest.outputs if o.name == "disc_probability")
    assert isinstance(centre_spec, PointOutput) and isinstance(mask_spec, MaskOutput)
    x, y = point_to_source(disc.raw["disc_centre"][uid], centre_spec, disc.geometry[uid])
    row, col = truth.disc_center
    assert math.hypot(x - col, y - row) <= DISC_CENTRE_TOLERANCE_PX
    assert truth.fov_mask[round(y), round(x)]
    mask = mask_to_source(disc.raw["disc_probability"][uid], disc.geometry[uid]) >= 0.5
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    true_disc = np.hypot(yy - row, xx - col) <= truth.disc_radius
    assert _dice(mask, true_disc) >= DISC_DICE_MIN
    # disc-metrics measures the same mask; the node reports it in source pixels and mm
    metrics = result.models["disc-metrics"]
    reported = {}
    for spec in registry.get("disc-metrics").manifest.outputs:
        assert isinstance(spec, MeasurementOutput)
        reported[spec.name] = {m.unit.code: m.value for m in measured_values(
            metrics.raw[spec.name][uid], spec, metrics.geometry[uid])}
    true_diameter = 2.0 * truth.disc_radius  # source pixels
    assert reported["disc_diameter"]["{px}"] == pytest.approx(true_diameter, rel=0.12)
    assert reported["disc_area"]["{px2}"] == pytest.approx(math.pi * truth.disc_radius ** 2,
                                                           rel=0.25)
    assert reported["disc_diameter"]["mm"] == pytest.approx(
        reported["disc_diameter"]["{px}"] * SPACING[0], rel=1e-6)
    assert reported["disc_area"]["mm2"] == pytest.approx(
        reported["disc_area"]["{px2}"] * SPACING[0] * SPACING[1], rel=1e-6)
    assert set(reported["disc_fov_ratio"]) == {"1"}  # a ratio needs no calibration


def test_quality_gate_stops_a_blurred_dark_image(executor: GraphExecutor,
                                                 registry: Registry) -> None:
    rgb, _ = synthetic_fundus_with_truth(SIZE, "R", seed=1)
    bad = np.array(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(6)), dtype=np.float32)
    bad_rgb = np.clip(bad * 0.2, 0, 255).astype(np.uint8)
    images = [SourceImage("1.2.3.1", rgb), SourceImage("1.2.3.2", bad_rgb)]
    result = run_graph(executor, registry, ["fundus-quality", "optic-disc"], images)
    findings = result.models["fundus-quality"].findings["quality"]
    assert findings["1.2.3.1"].label == "gradable"
    assert findings["1.2.3.2"].label == "ungradable"
    assert "1.2.3.2" in result.models["optic-disc"].skipped  # the gate stopped it
    assert result.models["optic-disc"].run_images == ["1.2.3.1"]


@pytest.mark.parametrize("vessel_model", ["vessel-seg", "vessel-seg-classic"])
def test_vessel_models_and_metrics_on_synthetic(executor: GraphExecutor, registry: Registry,
                                                vessel_model: str) -> None:
    rgb, truth = synthetic_fundus_with_truth(SIZE, "R", seed=2)
    image = SourceImage("1.2.3.9", rgb)
    result = run_graph(executor, registry, [vessel_model, "vessel-metrics"], [image])
    seg = result.models[vessel_model]
    spec = registry.get(vessel_model).manifest.outputs[0]
    assert isinstance(spec, MaskOutput)
    probability = seg.raw["vessel_probability"]["1.2.3.9"]
    mask = mask_to_source(probability, seg.geometry["1.2.3.9"]) >= spec.threshold
    dice = _dice(mask & truth.fov_mask, truth.vessel_mask)
    assert dice >= VESSEL_DICE_MIN[vessel_model], dice
    metrics = result.models["vessel-metrics"].raw
    density = float(metrics["vessel_density"]["1.2.3.9"].reshape(-1)[0])
    # the metric takes the vessel model's mask at that model's own threshold (binarise)
    model_mask = np.asarray(probability).reshape(768, 768) >= spec.threshold
    yy, xx = np.mgrid[0:768, 0:768] + 0.5
    fov = np.hypot(yy - 384, xx - 384) <= 384
    assert density == pytest.approx(100.0 * (model_mask & fov).sum() / fov.sum(), rel=1e-3)
    assert 2.0 <= density <= 30.0
    calibre = float(metrics["vessel_calibre"]["1.2.3.9"].reshape(-1)[0])
    assert 1.5 <= calibre <= 20.0


def test_chase_image_is_gradable_with_its_disc_inside_the_fov(executor: GraphExecutor,
                                                              registry: Registry) -> None:
    path = CHASE / "images" / "Image_11L.jpg"
    if not path.is_file():
        unavailable(f"{path} not found (../shared/data)")
    rgb = np.array(Image.open(path).convert("RGB"))
    image = SourceImage("1.2.3.11", rgb)
    result = run_graph(executor, registry, ["fundus-quality", "optic-disc", "disc-metrics"],
                       [image])
    assert result.models["fundus-quality"].findings["quality"]["1.2.3.11"].label == "gradable"
    disc = result.models["optic-disc"]
    centre_spec = registry.get("optic-disc").manifest.outputs[1]
    assert isinstance(centre_spec, PointOutput)
    x, y = point_to_source(disc.raw["disc_centre"]["1.2.3.11"], centre_spec,
                           disc.geometry["1.2.3.11"])
    assert rgb[round(y), round(x)].max() > 40  # inside the lit field of view
    ratio = float(result.models["disc-metrics"].raw["disc_fov_ratio"]["1.2.3.11"].reshape(-1)[0])
    assert 0.05 <= ratio <= 0.3


@pytest.mark.parametrize("name", ["Image_01L", "Image_01R"])
def test_laterality_on_a_real_chase_image_of_each_eye(executor: GraphExecutor,
                                                      registry: Registry, name: str) -> None:
    """CHASE_DB1 is disc-centred: the disc's place in the frame does not tell the eye, the
    macula's side of the disc does (p_right measured 0.05 for 01L, 0.87 for 01R)."""
    path = CHASE / "images" / f"{name}.jpg"
    if not path.is_file():
        unavailable(f"{path} not found (../shared/data)")
    rgb = np.array(Image.open(path).convert("RGB"))
    image = SourceImage("1.2.3.21", rgb)
    result = run_graph(executor, registry, ["laterality"], [image])
    found = result.models["laterality"].findings["laterality"]["1.2.3.21"]
    assert found.label == ("right" if name.endswith("R") else "left")


def _session(registry: Registry, model_id: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(registry.get(model_id).onnx_path),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("width", [3, 6, 10])
def test_vessel_metrics_on_known_geometry(registry: Registry, width: int) -> None:
    """Straight bars of known width and length inside the FOV circle of the 768 crop."""
    mask = np.zeros((1, 1, 768, 768), np.float32)
    length = 300
    for top in (250, 400, 500):
        mask[0, 0, top:top + width, 234:234 + length] = 1.0
    density, calibre = _session(registry, "vessel-metrics").run(
        None, {"vessel_probability": mask})
    yy, xx = np.mgrid[0:768, 0:768] + 0.5
    fov_pixels = float((np.hypot(yy - 384, xx - 384) <= 384).sum())
    assert float(density.reshape(-1)[0]) == pytest.approx(
        100.0 * 3 * width * length / fov_pixels, rel=1e-4)
    # 2 * area / boundary: boundary = 2 * length + 2 * (width - 2) per bar, so within 5 %
    assert float(calibre.reshape(-1)[0]) == pytest.approx(width, rel=0.05)


@pytest.mark.parametrize("radius", [10.0, 20.0, 35.0])
def test_disc_metrics_on_known_geometry(registry: Registry, radius: float) -> None:
    yy, xx = np.mgrid[0:256, 0:256]
    disc = (np.hypot(yy - 120.3, xx - 170.7) <= radius).astype(np.float32)[None, None]
    area, diameter, ratio = _session(registry, "disc-metrics").run(
        None, {"disc_probability": disc})
    assert float(area.reshape(-1)[0]) == float(disc.sum())
    assert float(diameter.reshape(-1)[0]) == pytest.approx(2 * radius, rel=0.03)
    assert float(ratio.reshape(-1)[0]) == pytest.approx(2 * radius / 256, rel=0.03)


@pytest.mark.parametrize("preset_id", ["ophthalmology-comprehensive", "glaucoma-clinic"])
def test_presets_run_on_the_demo_study(tmp_path: Path, executor: GraphExecutor,
                                       registry: Registry, preset_id: str) -> None:
    settings = load_settings(ROOT / "config" / "dicomnode.yaml")
    presets = load_presets(settings.presets.path, registry=registry,
                           destinations=set(settings.destinations))
    preset = next(p for p in presets.ordered() if p.id == preset_id)
    graph = resolve(Selection.of(preset.models, modality="OP", preset=preset_id), registry)
    images = []
    for path in demo_study(tmp_path, size=768):
        ds = pydicom.dcmread(path)
        images.append(SourceImage(str(ds.SOPInstanceUID), decode_rgb(ds),
                                  laterality=str(ds.get("ImageLaterality", "")) or None))
    result = executor.run(graph, images)
    assert result.outcome == "done", result.problems()
    for model_id in graph.models:
        assert result.models[model_id].run_images == [i.sop_instance_uid for i in images]
    if "laterality" in graph.models:
        found = result.models["laterality"].findings["laterality"]
        for image in images:
            assert found[image.sop_instance_uid].label[0].upper() == image.laterality


@pytest.mark.parametrize("side", ["L", "R"])
def test_laterality_model_fills_in_a_missing_header_laterality(
    tmp_path: Path, executor: GraphExecutor, registry: Registry, side: str
) -> None:
    rgb, _ = synthetic_fundus_with_truth(SIZE, side, seed=4)  # type: ignore[arg-type]
    image = SourceImage("1.2.3.31", rgb, laterality=None)
    result = run_graph(executor, registry, ["laterality"], [image])
    write_outputs(tmp_path / "job", result, registry, {"job": 1})
    findings = results_from_outputs(tmp_path / "job", registry).findings["1.2.3.31"]
    assert findings.inferred_laterality == side

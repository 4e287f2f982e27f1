"""`dicomnode evaluate` on tiny hand-made datasets whose figures are computed by hand.

The models are the tiny fixture graphs (tests/support/onnx_models.py) in a temporary registry:
a segmenter (mask = green > 0.5), a classifier (p(gradable) = sigmoid(16 * mean green - 8)) and
a measurement (fraction of the segmenter's mask that is set). No field-of-view crop, and the
images are the models' 32 x 32 size, so every pixel's prediction is known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from sqlalchemy import select

from dicomnode.cli import main
from dicomnode.db import open_database
from dicomnode.db.models import ModelEvaluation
from tests.support.onnx_models import (
    RegistryWriter,
    classifier_manifest,
    green_threshold_segmenter,
    mean_colour_classifier,
    measurement_manifest,
    segmenter_manifest,
)

SIZE = 32


def _no_crop(manifest: dict[str, Any]) -> dict[str, Any]:
    for spec in manifest["inputs"]:
        if "size" in spec:
            spec["crop_fov"] = False
    return manifest


@pytest.fixture
def config(tmp_path: Path) -> Path:
    writer = RegistryWriter(tmp_path / "registry")
    writer.add(_no_crop(segmenter_manifest("green-seg")))
    quality = _no_crop(classifier_manifest("green-quality", gate=False))
    writer.add(quality, mean_colour_classifier(bias=[4.0, -4.0]))
    # an alternative source: a mask of green > 0.75 instead of > 0.5
    writer.add(_no_crop(segmenter_manifest("green-seg-high", conflicts=["green-seg"])),
               green_threshold_segmenter(threshold=0.75))
    # three ordered grades from the mean green g: logits (0, 10g - 3, 20g - 10)
    grade = _no_crop(classifier_manifest("green-grade", gate=False, output="grade"))
    grade["outputs"][0].update(
        classes=[{"label": name, "code": {"scheme": "99DICOMNODE", "value": f"G{i}",
                                          "meaning": name}}
                 for i, name in enumerate(("none", "mild", "severe"))],
        threshold=None, positive=None)
    writer.add(grade, mean_colour_classifier(
        output_name="grade", classes=3, weights=[[0, 0, 0], [0, 10, 20], [0, 0, 0]],
        bias=[0, -3, -10]))
    writer.add(measurement_manifest("mask-fraction",
                                    source=["green-seg.mask", "green-seg-high.mask"]))
    (tmp_path / "presets").mkdir()
    path = tmp_path / "dicomnode.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"path": str(tmp_path / "storage")},
        "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
        "registry": {"path": str(tmp_path / "registry")},
        "presets": {"path": str(tmp_path / "presets")},
    }), encoding="utf-8")
    return path


def _image(path: Path, green: np.ndarray) -> str:
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[..., 0] = 120
    rgb[..., 1] = green
    Image.fromarray(rgb).save(path)
    return path.name


def _columns_mask(path: Path, columns: list[range]) -> str:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for cols in columns:
        mask[:, cols.start:cols.stop] = 255
    Image.fromarray(mask).save(path)
    return path.name


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _evaluate(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["evaluate", *args, "--json", "--config", str(config)]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def _segmentation_data(folder: Path, with_fov: bool) -> Path:
    folder.mkdir()
    green = np.zeros((SIZE, SIZE), np.uint8)
    green[:, 0:16] = 255  # predicted vessel: columns 0-15
    image = _image(folder / "a.png", green)
    truth = _columns_mask(folder / "a_truth.gif", [range(0, 12), range(16, 20)])
    if not with_fov:
        return _csv(folder / "seg.csv", "image,truth", [f"{image},{truth}"])
    fov = _columns_mask(folder / "a_fov.png", [range(0, 28)])
    return _csv(folder / "seg.csv", "image,truth,fov", [f"{image},{truth},{fov}"])


def test_segmentation_figures_match_hand_counts(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # TP = 12 cols, FP = 4, FN = 4, TN = 12 (x 32 rows)
    result = _evaluate(config, capsys, "green-seg",
                       "--dataset", str(_segmentation_data(tmp_path / "d", False)))
    assert result["images"] == 1
    assert result["dice"] == pytest.approx(0.75)
    assert result["iou"] == pytest.approx(0.6)
    assert result["sensitivity"] == pytest.approx(0.75)
    assert result["specificity"] == pytest.approx(0.75)
    assert result["accuracy"] == pytest.approx(0.75)
    # binary scores: P(pos > neg) = 0.75 * 0.75, ties 0.375 count half
    assert result["auc"] == pytest.approx(0.75)
    # AP: score 1 (16 columns): P 12/16 at recall 12/16; score 0 adds recall 4/16 at P 16/32:
    # 3/4 * 3/4 + 1/2 * 1/4 = 11/16. One image: every resample is that image.
    assert result["aupr"] == pytest.approx(11 / 16)
    assert result["auc_ci"] == pytest.approx([0.75, 0.75])
    assert result["aupr_ci"] == pytest.approx([11 / 16, 11 / 16])
    assert result["bootstrap"]["resampled"] == "images"


def test_segmentation_with_a_fov_column_counts_only_inside(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the FOV drops columns 28-31 (true negatives): TN = 8 cols
    result = _evaluate(config, capsys, "green-seg@1.0.0",
                       "--dataset", str(_segmentation_data(tmp_path / "d", True)))
    assert result["dice"] == pytest.approx(0.75)
    assert result["specificity"] == pytest.approx(8 / 12)
    assert result["accuracy"] == pytest.approx((12 + 8) / 28)


def test_an_image_with_truth_none_counts_its_pixels_as_negatives(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _segmentation_data(tmp_path / "d", False)  # TP 12, FP 4, FN 4, TN 12 columns
    green = np.zeros((SIZE, SIZE), np.uint8)
    green[:, 0:8] = 255  # a second image with nothing to find; 8 columns marked
    healthy = _image(tmp_path / "d" / "b.png", green)
    with data.open("a", encoding="utf-8") as handle:
        handle.write(f"{healthy}, None\n")
    result = _evaluate(config, capsys, "green-seg", "--dataset", str(data))
    # + FP 8, TN 24 columns: Dice 24 / (24 + 12 + 4), specificity 36 / 48
    assert result["images"] == 2
    assert result["dice"] == pytest.approx(24 / 40)
    assert result["sensitivity"] == pytest.approx(0.75)
    assert result["specificity"] == pytest.approx(36 / 48)
    # AP: score 1 (24 columns) holds 12 positives: P 1/2 at recall 3/4; then 1/4 at P 16/64
    assert result["aupr"] == pytest.approx(0.5 * 0.75 + 0.25 * 0.25)
    only_none = _csv(tmp_path / "none.csv", "image,truth", [f"d/{healthy},none"])
    assert main(["evaluate", "green-seg", "--dataset", str(only_none),
                 "--config", str(config)]) == 2
    assert "none.csv: every row's truth is 'none'" in capsys.readouterr().err


def test_mask_threshold_option_changes_what_truth_is(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    green = np.zeros((SIZE, SIZE), np.uint8)
    green[:, 0:16] = 255  # predicted: columns 0-15
    image = _image(folder / "a.png", green)
    truth = np.full((SIZE, SIZE), 3, np.uint8)  # a JPEG-like floor of 3, never "inside"
    truth[:, 0:8] = 200  # certain: columns 0-7
    truth[:, 8:16] = 90  # faint: columns 8-15, below half of 200 (100), above 80
    Image.fromarray(truth).save(folder / "a_truth.png")
    csv_path = _csv(folder / "t.csv", "image,truth", [f"{image},a_truth.png"])
    # Default rule: truth = columns 0-7; TP 8, FP 8 columns -> sensitivity 1, Dice 16/24.
    default = _evaluate(config, capsys, "green-seg", "--dataset", str(csv_path))
    assert default["sensitivity"] == 1.0
    assert default["dice"] == pytest.approx(16 / 24)
    # --mask-threshold 80: truth = columns 0-15 = the prediction -> Dice 1, specificity 1.
    lowered = _evaluate(config, capsys, "green-seg", "--dataset", str(csv_path),
                        "--mask-threshold", "80")
    assert lowered["dice"] == 1.0
    assert lowered["specificity"] == 1.0


def test_classification_auc_sensitivity_specificity(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    rows = []
    for index, (green, label) in enumerate(
        [(0.2, "ungradable"), (0.4, "gradable"), (0.6, "0"), (0.8, "1")]
    ):
        plane = np.full((SIZE, SIZE), round(green * 255), np.uint8)
        rows.append(f"{_image(folder / f'i{index}.ppm', plane)},{label}")
    csv_path = _csv(folder / "labels.csv", "image,label", rows)
    result = _evaluate(config, capsys, "green-quality", "--dataset", str(csv_path))
    # predicted gradable (green > 0.5): 0.6 and 0.8; truly gradable: 0.4 and 0.8
    assert result["sensitivity"] == pytest.approx(0.5)
    assert result["specificity"] == pytest.approx(0.5)
    assert result["confusion_matrix"] == [[1, 1], [1, 1]]
    assert result["auc"] == pytest.approx(0.75)  # 3 of 4 (positive, negative) pairs ordered


def test_multi_class_kappa_and_per_class_auc_recorded(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "g"
    folder.mkdir()
    rows = []
    # green 0.2 -> none, 0.5 -> mild, 0.8 -> severe; the second 0.5 image is truly severe
    for index, (green, label) in enumerate([(0.2, "none"), (0.5, "1"), (0.8, "severe"),
                                            (0.5, "Severe")]):
        plane = np.full((SIZE, SIZE), round(green * 255), np.uint8)
        rows.append(f"{_image(folder / f'g{index}.png', plane)},{label}")
    csv_path = _csv(folder / "grades.csv", "image,label", rows)
    result = _evaluate(config, capsys, "green-grade", "--output", "grade",
                       "--dataset", str(csv_path), "--record")
    # truth 0 1 2 2, reported 0 1 2 1: sum wO = 1/4; marginals truth [1,1,2], reported [1,2,1]
    # give sum wE = 5/4 -> kappa 1 - (1/4)/(5/4) = 4/5.
    assert result["kappa"] == pytest.approx(0.8)
    # severe (the positive, last class) vs rest: p(severe) at g .8 beats both negatives, the
    # truly severe .5 image ties the mild .5 image (1/2) and beats .2 -> 3.5 / 4.
    assert result["auc"] == pytest.approx(7 / 8)
    # mild: its image (p .79) ties the other .5 image, beats .2 and .8 -> 2.5 / 3.
    assert result["auc_per_class"] == pytest.approx({"none": 1.0, "mild": 5 / 6,
                                                     "severe": 7 / 8})
    # severe reported only for the .8 image: sensitivity 1/2, specificity 2/2
    assert result["sensitivity"] == pytest.approx(0.5)
    assert result["specificity"] == 1.0
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    low, high = result["auc_ci"]
    assert 0.0 <= low <= 7 / 8 <= high <= 1.0
    assert result["decision"] == "most probable class"
    manifest = yaml.safe_load(
        (tmp_path / "registry" / "green-grade" / "1.0.0" / "manifest.yaml").read_text())
    figures = manifest["metrics"][-1]["figures"]
    assert figures["kappa"] == pytest.approx(0.8)
    assert figures["auc_ci"] == [pytest.approx(low), pytest.approx(high)]
    assert figures["auc_per_class.mild"] == pytest.approx(5 / 6, abs=1e-6)
    assert not any(key.startswith("bootstrap") for key in figures)


def test_measurement_mae_and_bias_and_record(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    rows = []
    for columns, truth in ((8, 0.2), (16, 0.6)):  # measured fractions 0.25 and 0.5
        plane = np.zeros((SIZE, SIZE), np.uint8)
        plane[:, :columns] = 255
        rows.append(f"{_image(folder / f'm{columns}.tif', plane)},{truth}")
    csv_path = _csv(folder / "fractions.csv", "image,value", rows)
    result = _evaluate(config, capsys, "mask-fraction", "--dataset", str(csv_path), "--record")
    assert result["mae"] == pytest.approx(0.075)
    assert result["bias"] == pytest.approx(-0.025)
    manifest = yaml.safe_load(
        (tmp_path / "registry" / "mask-fraction" / "1.0.0" / "manifest.yaml").read_text())
    record = manifest["metrics"][-1]
    assert record["dataset"] == "fractions"
    assert record["dataset_sha256"] == result["dataset_sha256"]
    assert len(record["dataset_sha256"]) == 64
    assert record["figures"]["mae"] == pytest.approx(0.075)
    assert main(["models", "check", "--config", str(config)]) == 0  # still a valid manifest
    database = open_database(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        with database.transaction() as session:
            rows_db = session.scalars(select(ModelEvaluation)).all()
            assert [(r.model_id, r.dataset) for r in rows_db] == [("mask-fraction", "fractions")]
            assert json.loads(rows_db[0].figures)["bias"] == pytest.approx(-0.025)
    finally:
        database.dispose()


def test_with_picks_the_source_a_measurement_is_fed_from(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    plane = np.zeros((SIZE, SIZE), np.uint8)
    plane[:, :8] = 255  # above both thresholds
    plane[:, 8:16] = 160  # 0.63: above 0.5 only
    csv_path = _csv(folder / "w.csv", "image,value", [f"{_image(folder / 'w.png', plane)},0.25"])
    default = _evaluate(config, capsys, "mask-fraction", "--dataset", str(csv_path))
    assert default["graph"] == {"mask-fraction": "1.0.0", "green-seg": "1.0.0"}
    assert default["mae"] == pytest.approx(0.25)  # green-seg marks 16 of 32 columns
    high = _evaluate(config, capsys, "mask-fraction", "--dataset", str(csv_path),
                     "--with", "green-seg-high")
    assert high["graph"] == {"mask-fraction": "1.0.0", "green-seg-high": "1.0.0"}
    assert high["mae"] == pytest.approx(0.0)
    # a model that cannot join the graph is a clear error, not a silent default
    code = main(["evaluate", "mask-fraction", "--dataset", str(csv_path), "--with", "green-seg",
                 "--with", "green-seg-high", "--config", str(config)])
    assert code != 0
    assert "conflict" in capsys.readouterr().err


def test_bad_datasets_are_refused_with_the_line(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = _csv(tmp_path / "missing.csv", "image,truth", ["nothere.png,alsonot.png"])
    assert main(["evaluate", "green-seg", "--dataset", str(missing),
                 "--config", str(config)]) == 2
    assert "missing.csv:2" in capsys.readouterr().err
    no_kind = _csv(tmp_path / "nokind.csv", "image,other", ["a.png,1"])
    assert main(["evaluate", "green-seg", "--dataset", str(no_kind),
                 "--config", str(config)]) == 2
    assert "'truth', 'label' or 'value'" in capsys.readouterr().err
    assert main(["evaluate", "no-such-model", "--dataset", str(no_kind),
                 "--config", str(config)]) == 2

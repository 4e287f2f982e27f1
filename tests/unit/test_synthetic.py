"""The synthetic fundus generator: reproducible, anatomically arranged, wrapped as OP."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from dicomnode.commands import demo as demo_command
from dicomnode.synthetic import (
    OP_8BIT_STORAGE,
    op_dataset,
    synthetic_fundus,
    synthetic_fundus_with_truth,
)

SIZE = 256


def _disc_mask(
    shape: tuple[int, int], centre: tuple[float, float], radius: float
) -> NDArray[np.bool_]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    inside: NDArray[np.bool_] = np.hypot(yy - centre[0], xx - centre[1]) <= radius
    return inside


def test_same_seed_same_image_other_seed_other_image() -> None:
    first = synthetic_fundus(SIZE, "R", seed=3)
    again = synthetic_fundus(SIZE, "R", seed=3)
    other = synthetic_fundus(SIZE, "R", seed=4)
    assert first.shape == (SIZE, SIZE, 3)
    assert first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_right_eye_disc_on_viewers_right_left_eye_mirrored() -> None:
    _, right = synthetic_fundus_with_truth(SIZE, "R", seed=1)
    _, left = synthetic_fundus_with_truth(SIZE, "L", seed=1)
    centre = (SIZE - 1) / 2
    assert right.disc_center[1] > centre + 0.1 * SIZE
    assert left.disc_center[1] < centre - 0.1 * SIZE
    # The macula lies temporal to the disc: on the other side of it from the nose.
    assert right.macula_center[1] < right.disc_center[1]
    assert left.macula_center[1] > left.disc_center[1]
    # Mirror arrangement: columns reflect about the centre (the anatomy jitters a little).
    assert abs((SIZE - 1 - left.disc_center[1]) - right.disc_center[1]) < 0.03 * SIZE
    assert abs(left.disc_center[0] - right.disc_center[0]) < 0.03 * SIZE


def test_disc_found_by_brightness_where_truth_says() -> None:
    """The brightest blob of the picture is the disc, not only the truth's claim."""
    for laterality in ("R", "L"):
        rgb, truth = synthetic_fundus_with_truth(SIZE, laterality, seed=2)
        luminance = rgb.astype(np.float64).mean(axis=2)
        bright = luminance >= np.percentile(luminance[truth.fov_mask], 99.5)
        rows, cols = np.nonzero(bright)
        assert abs(rows.mean() - truth.disc_center[0]) < truth.disc_radius
        assert abs(cols.mean() - truth.disc_center[1]) < truth.disc_radius


def test_disc_brighter_and_yellower_than_background_fundus() -> None:
    rgb, truth = synthetic_fundus_with_truth(SIZE, "R", seed=0)
    disc = _disc_mask(rgb.shape[:2], truth.disc_center, truth.disc_radius * 0.8)
    background = truth.fov_mask & ~truth.vessel_mask & ~_disc_mask(
        rgb.shape[:2], truth.disc_center, truth.disc_radius * 1.5
    )
    disc_px = rgb[disc & ~truth.vessel_mask].astype(np.float64)
    bg_px = rgb[background].astype(np.float64)
    assert disc_px.mean() > bg_px.mean() + 50
    # Yellowish: much more green relative to red than the red-orange fundus.
    assert (disc_px[:, 1] / disc_px[:, 0]).mean() > (bg_px[:, 1] / bg_px[:, 0]).mean() + 0.25
    # Reddish-orange background: red well above green above blue.
    red, green, blue = bg_px.mean(axis=0)
    assert red > green > blue
    assert red > 1.5 * green


def test_dark_surround_and_field_of_view() -> None:
    rgb, truth = synthetic_fundus_with_truth(SIZE, "R", seed=0)
    # Beyond the anti-aliased one-pixel rim, the camera's surround is near black.
    grown = truth.fov_mask.copy()
    for axis in (0, 1):
        for shift in (-1, 1):
            grown |= np.roll(truth.fov_mask, shift, axis=axis)
    assert rgb[~grown].max() <= 10
    assert 0.5 < truth.fov_mask.mean() < 0.75  # a circle filling most of the frame
    assert rgb[truth.fov_mask][:, 0].mean() > 80


def test_macula_darker_than_surrounding_fundus() -> None:
    rgb, truth = synthetic_fundus_with_truth(SIZE, "R", seed=0)
    luminance = rgb.astype(np.float64).mean(axis=2)
    usable = truth.fov_mask & ~truth.vessel_mask
    fovea = _disc_mask(rgb.shape[:2], truth.macula_center, 0.02 * SIZE) & usable
    ring = (
        _disc_mask(rgb.shape[:2], truth.macula_center, 0.2 * SIZE)
        & ~_disc_mask(rgb.shape[:2], truth.macula_center, 0.12 * SIZE)
        & ~_disc_mask(rgb.shape[:2], truth.disc_center, truth.disc_radius * 1.5)
        & usable
    )
    assert luminance[fovea].mean() < luminance[ring].mean() - 10


@pytest.mark.parametrize("size", [256, 512])
def test_vessels_plausible_fraction_darker_and_narrowing(size: int) -> None:
    rgb, truth = synthetic_fundus_with_truth(size, "R", seed=5)
    fraction = truth.vessel_mask[truth.fov_mask].mean()
    assert 0.04 < fraction < 0.2  # real fundus photographs: roughly 8-14 %
    green = rgb[..., 1].astype(np.float64)
    near_disc = _disc_mask(rgb.shape[:2], truth.disc_center, truth.disc_radius * 1.2)
    vessels = truth.vessel_mask & ~near_disc
    assert green[vessels].mean() < green[truth.fov_mask & ~truth.vessel_mask].mean() - 10
    # Vessels are denser near the disc (wide trunks) than far from it (thin branches).
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy - truth.disc_center[0], xx - truth.disc_center[1])
    near = truth.fov_mask & (dist > truth.disc_radius) & (dist < 3 * truth.disc_radius)
    far = truth.fov_mask & (dist > 6 * truth.disc_radius)
    assert truth.vessel_mask[near].mean() > 1.5 * truth.vessel_mask[far].mean()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="laterality"):
        synthetic_fundus(SIZE, "X", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        synthetic_fundus(16)


def test_op_dataset_round_trips_through_a_file(tmp_path: Path) -> None:
    rgb = synthetic_fundus(128, "L", seed=0)
    ds = op_dataset(rgb, laterality="L", patient_id="P1", pixel_spacing=(0.01, 0.012))
    path = tmp_path / "op.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == OP_8BIT_STORAGE
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.Modality == "OP"
    assert back.ImageLaterality == "L"
    assert back.PatientID == "P1"
    assert [float(v) for v in back.PixelSpacing] == [0.01, 0.012]
    assert np.array_equal(back.pixel_array, rgb)


def test_op_dataset_refuses_non_rgb() -> None:
    with pytest.raises(ValueError, match="uint8"):
        op_dataset(np.zeros((8, 8), dtype=np.uint8), laterality="R")


def test_demo_study_command_writes_two_eyes_of_one_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    demo_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["demo-study", "--out", str(tmp_path), "--size", "128", "--patient-id", "PX9"]
    )
    assert args.func(args) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(printed) == 2
    datasets = [pydicom.dcmread(path) for path in printed]
    assert {ds.ImageLaterality for ds in datasets} == {"L", "R"}
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 2  # one series per eye
    assert len({ds.SOPInstanceUID for ds in datasets}) == 2
    assert all(ds.PatientID == "PX9" for ds in datasets)
    assert all(ds.pixel_array.shape == (128, 128, 3) for ds in datasets)


def test_demo_study_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomnode import cli

    assert "dicomnode.commands.demo" in cli.COMMAND_MODULES
    # Only this command's module: the others are tested on their own and need settings.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("dicomnode.commands.demo",))
    assert cli.main(["demo-study", "--out", str(tmp_path), "--size", "96", "--seed", "7"]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    assert sorted(pydicom.dcmread(p).ImageLaterality for p in printed) == ["L", "R"]

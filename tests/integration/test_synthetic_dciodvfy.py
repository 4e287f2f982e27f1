"""dicom3tools `dciodvfy` finds no errors in the synthetic Ophthalmic Photography files."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from dicomnode.synthetic import demo_study, op_dataset, synthetic_fundus
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration


def _dciodvfy(path: Path) -> list[str]:
    tool = require_tool("dciodvfy", "dicom3tools")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    # It names the IOD it recognised; anything else is a finding.
    assert any("OphthalmicPhotography8BitImage" in line for line in lines), lines
    return lines


@pytest.mark.parametrize("pixel_spacing", [None, (0.0117, 0.0117)])
@pytest.mark.parametrize("laterality", ["R", "L"])
def test_op_file_has_no_dciodvfy_errors(
    tmp_path: Path, laterality: str, pixel_spacing: Sequence[float] | None
) -> None:
    rgb = synthetic_fundus(128, laterality, seed=0)  # type: ignore[arg-type]
    ds = op_dataset(rgb, laterality=laterality, pixel_spacing=pixel_spacing)  # type: ignore[arg-type]
    path = tmp_path / "op.dcm"
    ds.save_as(path, enforce_file_format=True)
    lines = _dciodvfy(path)
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == [], "\n".join(lines)


def test_demo_study_files_have_no_dciodvfy_errors(tmp_path: Path) -> None:
    for path in demo_study(tmp_path, size=128, seed=1):
        lines = _dciodvfy(path)
        assert [line for line in lines if line.startswith("Error")] == [], "\n".join(lines)


def test_the_check_can_fail(tmp_path: Path) -> None:
    """A file missing a type 1 attribute is reported, so a clean result means something."""
    ds = op_dataset(synthetic_fundus(96), laterality="R")
    del ds.ImageLaterality
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert any(line.startswith("Error") for line in _dciodvfy(path))

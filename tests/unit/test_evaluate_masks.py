"""Truth and FOV masks are binarised by one documented rule: a pixel is inside when its value
is >= half the mask's largest value (or >= an explicit threshold); palette colours, never raw
palette indices; a mask that says nothing (empty, all inside) is refused naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode.evaluate.dataset import DatasetError, load_mask

# Foreground: the top-left 2 x 3 block of a 4 x 6 mask.
WANT = np.zeros((4, 6), dtype=bool)
WANT[:2, :3] = True


def _palette_image(path: Path) -> Path:
    """Background palette index 3 (black), foreground index 0 (white): read as raw indices the
    background (3) would be the larger value and the mask inverted."""
    indices = np.full((4, 6), 3, np.uint8)
    indices[WANT] = 0
    image = Image.fromarray(indices, mode="P")
    palette = [255, 255, 255, 255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (256 * 3 - 12)
    image.putpalette(palette)
    image.save(path, optimize=False)  # keep the indices (GIF would otherwise remap them)
    return path


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_mask_reads_its_colours(tmp_path: Path, suffix: str) -> None:
    path = _palette_image(tmp_path / f"mask{suffix}")
    with Image.open(path) as img:
        assert img.mode == "P"
        assert np.asarray(img)[3, 5] == 3  # the file really holds index 3 as background
    assert np.array_equal(load_mask(path), WANT)


def test_half_of_the_maximum_and_an_explicit_threshold(tmp_path: Path) -> None:
    # Grey levels: background 3 (a JPEG-like floor), foreground 250, one pixel 120.
    grey = np.full((4, 6), 3, np.uint8)
    grey[WANT] = 250
    grey[3, 5] = 120
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    # Half of 250 = 125: 120 is outside, 250 inside (a "> 0" rule would take everything).
    assert np.array_equal(load_mask(path), WANT)
    with_pixel = WANT.copy()
    with_pixel[3, 5] = True
    assert np.array_equal(load_mask(path, threshold=100), with_pixel)  # 120 >= 100
    # 0/1 masks and 16-bit masks follow the same rule.
    Image.fromarray(WANT.astype(np.uint8)).save(tmp_path / "ones.png")
    assert np.array_equal(load_mask(tmp_path / "ones.png"), WANT)
    Image.fromarray(WANT.astype(np.uint16) * 65535).save(tmp_path / "deep.png")
    assert np.array_equal(load_mask(tmp_path / "deep.png"), WANT)


def test_colour_mask_uses_the_largest_channel(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[WANT, 0] = 255  # red lesions on black, as lesion datasets often draw them
    Image.fromarray(rgb).save(tmp_path / "red.png")
    assert np.array_equal(load_mask(tmp_path / "red.png", threshold=128), WANT)


def test_empty_and_full_masks_are_refused_by_name(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(DatasetError, match=r"empty\.png: the mask is empty"):
        load_mask(tmp_path / "empty.png")
    Image.fromarray(np.full((4, 6), 7, np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(DatasetError, match=r"flat\.png: every pixel of the mask is foreground"):
        load_mask(tmp_path / "flat.png")
    grey = WANT.astype(np.uint8) * 100
    Image.fromarray(grey).save(tmp_path / "dim.png")
    with pytest.raises(DatasetError, match=r"dim\.png: the mask is empty at threshold 200"):
        load_mask(tmp_path / "dim.png", threshold=200)

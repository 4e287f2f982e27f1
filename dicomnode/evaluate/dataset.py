"""Evaluation datasets: a CSV naming images (and truth) relative to itself.

Columns (header row required):
- `image,truth[,fov]`: segmentation; truth and fov are masks, binarised by `load_mask`'s rule
  (a pixel is inside when its value is at least half the mask's largest value, or at least an
  explicit threshold); truth `none`: the image has nothing of what is segmented (e.g. a lesion
  type it lacks), every pixel negative;
- `image,label`: classification; the label is a class label of the model (or 1/0, yes/no,
  true/false for the positive class and the rest);
- `image,value`: measurement; a number.
Images in any format Pillow reads (TIFF, GIF, PNG, JPEG, PPM/PGM...) or DICOM (decoded the
node's way). The dataset's content hash covers the CSV and every file it names.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError

from dicomnode.errors import DecodeError, DicomNodeError
from dicomnode.inference.decode import decode_rgb

logger = logging.getLogger(__name__)

DatasetKind = Literal["segmentation", "classification", "measurement"]

# A segmentation truth that says "nothing here": a word, because a blank mask *file* is more
# often a wrong file than a finding, and stays refused (`load_mask`).
NO_TRUTH = "none"


class DatasetError(DicomNodeError):
    """A dataset CSV, or a file it names, cannot be used."""


@dataclass(frozen=True)
class Row:
    line: int
    image: Path
    truth: Path | None = None  # segmentation: None when the CSV says `none` (NO_TRUTH)
    fov: Path | None = None
    label: str | None = None
    value: float | None = None


@dataclass(frozen=True)
class Dataset:
    path: Path
    kind: DatasetKind
    rows: tuple[Row, ...]

    @property
    def name(self) -> str:
        return self.path.stem

    def sha256(self) -> str:
        """Hash of the CSV bytes and, in row order, every file it names."""
        digest = hashlib.sha256(self.path.read_bytes())
        for row in self.rows:
            for item in (row.image, row.truth, row.fov):
                if item is not None:
                    digest.update(item.read_bytes())
        return digest.hexdigest()


def _kind(columns: list[str], path: Path) -> DatasetKind:
    names = set(columns)
    if "image" not in names:
        raise DatasetError(f"{path}: the header has no 'image' column (found {columns})")
    if "truth" in names:
        return "segmentation"
    if "label" in names:
        return "classification"
    if "value" in names:
        return "measurement"
    raise DatasetError(f"{path}: needs a 'truth', 'label' or 'value' column (found {columns})")


def _file(base: Path, text: str | None, path: Path, line: int, column: str) -> Path:
    if text is None or not text.strip():
        raise DatasetError(f"{path}:{line}: column '{column}' is empty")
    target = (base / text.strip()).resolve()
    if not target.is_file():
        raise DatasetError(f"{path}:{line}: {column} file {target} not found")
    return target


def read_dataset(path: Path) -> Dataset:
    """Parse and check a dataset CSV; file paths are relative to the CSV's folder."""
    if not path.is_file():
        raise DatasetError(f"dataset {path} not found")
    base = path.resolve().parent
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        kind = _kind(columns, path)
        rows: list[Row] = []
        for record in reader:
            line = reader.line_num
            image = _file(base, record.get("image"), path, line, "image")
            if kind == "segmentation":
                fov_text = record.get("fov")
                negative = (record.get("truth") or "").strip().lower() == NO_TRUTH
                rows.append(Row(line, image,
                                truth=None if negative
                                else _file(base, record.get("truth"), path, line, "truth"),
                                fov=_file(base, fov_text, path, line, "fov")
                                if fov_text and fov_text.strip() else None))
            elif kind == "classification":
                label = (record.get("label") or "").strip()
                if not label:
                    raise DatasetError(f"{path}:{line}: column 'label' is empty")
                rows.append(Row(line, image, label=label))
            else:
                try:
                    value = float((record.get("value") or "").strip())
                except ValueError as exc:
                    raise DatasetError(f"{path}:{line}: 'value' is not a number") from exc
                rows.append(Row(line, image, value=value))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    if kind == "segmentation" and all(row.truth is None for row in rows):
        raise DatasetError(f"{path}: every row's truth is '{NO_TRUTH}': there is nothing to "
                           "find, so no figure")
    logger.info("dataset %s: %d %s rows", path, len(rows), kind)
    return Dataset(path, kind, tuple(rows))


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(132)
    return path.suffix.lower() in (".dcm", ".dicom") or head[128:132] == b"DICM"


def load_rgb(path: Path) -> NDArray[np.uint8]:
    """An image file as (H, W, 3) uint8 RGB."""
    try:
        if _is_dicom(path):
            return decode_rgb(pydicom.dcmread(path))
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, InvalidDicomError, DecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the image: {exc}") from exc


def mask_values(path: Path) -> NDArray[np.float64]:
    """A mask file's pixel values, (H, W): grey levels as stored (8 or 16 bits), or for colour
    and palette images the largest of R, G, B (palette indices looked up in the palette)."""
    try:
        if _is_dicom(path):
            return np.asarray(decode_rgb(pydicom.dcmread(path)).max(axis=2), dtype=np.float64)
        with Image.open(path) as img:
            if img.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
                return np.asarray(img, dtype=np.float64)
            # P, PA, LA, RGB, RGBA, CMYK...: colours, never raw palette indices
            return np.asarray(np.asarray(img.convert("RGB")).max(axis=2), dtype=np.float64)
    except (OSError, UnidentifiedImageError, InvalidDicomError, DecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the mask: {exc}") from exc


def load_mask(path: Path, threshold: float | None = None) -> NDArray[np.bool_]:
    """A mask file as (H, W) bool.

    A pixel is inside when its value (`mask_values`) is >= half the mask's largest value, or
    >= `threshold` when one is given. A mask that comes out empty or all inside says nothing
    (a blank file, a wrong threshold) and is refused, naming the file.
    """
    values = mask_values(path)
    cut = float(values.max()) / 2.0 if threshold is None else float(threshold)
    if threshold is None and values.max() <= 0:
        raise DatasetError(f"{path}: the mask is empty (every pixel is 0)")
    mask = np.asarray(values >= cut)
    rule = "half its maximum" if threshold is None else f"threshold {threshold:g}"
    if not mask.any():
        raise DatasetError(f"{path}: the mask is empty at {rule} ({cut:g}; largest value "
                           f"{values.max():g})")
    if mask.all():
        raise DatasetError(f"{path}: every pixel of the mask is foreground at {rule} ({cut:g})")
    return mask

"""Decode a received image's pixel data into the (H, W, 3) uint8 RGB array models expect.

Every transfer syntax the node accepts goes through pydicom's decoders (pylibjpeg-libjpeg for
JPEG, pylibjpeg-openjpeg for JPEG 2000, pydicom's own RLE and native paths):
- colour is returned as RGB: YBR_FULL / YBR_FULL_422 (JPEG Baseline) are converted by
  pydicom; YBR_RCT / YBR_ICT (JPEG 2000) are undone by the JPEG 2000 decoder itself;
- monochrome is broadcast to three equal channels (MONOCHROME1 inverted first), palette
  colour goes through its lookup table;
- more than 8 bits per sample are scaled linearly to 0..255 (see `_to_uint8`);
- a multi-frame image gives its FIRST frame only: fundus photographs are single frames, and a
  multi-frame OP (e.g. a stereo pair or a sequence) is analysed by its first picture.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID

from dicomnode.errors import DecodeError

logger = logging.getLogger(__name__)

# Bits a channel may leave unused before we decide the data occupy a narrower range than
# Bits Stored claims (e.g. 12-bit sensor values in a 16-bit OP with Bits Stored 16).
_UNUSED_BITS_TOLERATED = 4


def decode_rgb(ds: Dataset) -> NDArray[np.uint8]:
    """The first frame of `ds` as an (H, W, 3) uint8 RGB array.

    Raises DecodeError (naming the SOP Instance UID and transfer syntax) when the pixel data
    are missing, use a syntax no installed decoder handles, or are corrupt.
    """
    sop_uid = str(ds.get("SOPInstanceUID", "(no SOP Instance UID)"))
    syntax = _transfer_syntax(ds)
    where = f"SOP Instance {sop_uid} (transfer syntax {_describe(syntax)})"
    if "PixelData" not in ds:
        raise DecodeError(f"{where} has no Pixel Data")
    if syntax is None:
        raise DecodeError(f"{where}: the dataset has no Transfer Syntax UID in its file meta")

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:  # a malformed IS, or a value that does not parse
        raise DecodeError(f"{where}: Number of Frames is not a number") from exc
    if frames > 1:
        logger.info("%s has %d frames; using the first", where, frames)
    try:
        decoder = get_decoder(syntax)
        if not decoder.is_available:
            missing = ", ".join(decoder.missing_dependencies) or "a decoding plugin"
            raise DecodeError(f"{where}: no decoder available (install {missing})")
        # raw=False (the default) converts YBR_FULL(_422) to RGB.
        array, meta = decoder.as_array(ds, index=0)
    except DecodeError:
        raise
    except Exception as exc:  # decoders raise many types; the caller needs one with context
        raise DecodeError(f"{where}: pixel data cannot be decoded: {exc}") from exc

    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation")))
    try:
        rgb = _to_rgb(array, photometric, ds)
        return _to_uint8(rgb, ds, where)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{where}: cannot convert {photometric} pixels to RGB: {exc}") from exc


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def _describe(syntax: UID | None) -> str:
    if syntax is None:
        return "unknown"
    return f"{syntax.name} {syntax}" if syntax.name != str(syntax) else str(syntax)


def _to_rgb(array: NDArray[np.generic], photometric: str, ds: Dataset) -> NDArray[np.generic]:
    """Three channels, whatever the photometric interpretation."""
    if photometric == "PALETTE COLOR":
        # The LUT output has the LUT's own depth (8 or 16 bits): record it for scaling.
        coloured: NDArray[np.generic] = apply_color_lut(array, ds)
        return coloured
    if array.ndim == 2:
        if photometric == "MONOCHROME1":
            # MONOCHROME1: the minimum is white; invert so that bright means bright.
            top = (1 << int(ds.BitsStored)) - 1
            array = (top - array.astype(np.int64)).clip(0, top)
        return np.repeat(array[..., None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 3:
        if photometric not in ("RGB", "YBR_RCT", "YBR_ICT"):
            # YBR_FULL(_422) is converted by pydicom (as_rgb); anything else left over is
            # an encoding we would mis-colour silently, so refuse it.
            raise ValueError(f"unsupported colour photometric interpretation {photometric}")
        return array
    raise ValueError(f"unexpected decoded shape {array.shape}")


def _to_uint8(array: NDArray[np.generic], ds: Dataset, where: str) -> NDArray[np.uint8]:
    """Scale to 0..255 linearly, keeping 8-bit data untouched (exact round trips)."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array, dtype=np.uint8)
    values = array.astype(np.float64)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        values = np.clip(values, 0.0, None)  # photographs have no meaningful negatives
    bits = int(ds.get("BitsStored", 8))
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        bits = 16 if array.dtype.itemsize > 1 else 8
    if bits <= 8:
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    full_scale = float((1 << bits) - 1)
    peak = float(values.max()) if values.size else 0.0
    if 0 < peak < 2 ** (bits - _UNUSED_BITS_TOLERATED):
        # The sensor's values fill far fewer bits than Bits Stored says (common for 10- or
        # 12-bit cameras writing 16-bit OP): scale to the bits actually used, else the
        # picture would come out nearly black.
        used = max(8, math.ceil(math.log2(peak + 1)))
        logger.info("%s: values use %d of %d stored bits; scaling to those", where, used, bits)
        full_scale = float((1 << used) - 1)
    return np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) Pixel Spacing in mm, or None when absent or unusable.

    Most fundus cameras leave it out; a malformed value is logged and treated as absent, so
    measurements are reported in pixels only rather than in wrong millimetres.
    """
    try:
        value = ds.get("PixelSpacing")  # a received file's bad DS text fails here, lazily
        if value is None:
            return None
        row, column = (float(v) for v in value)
    except (TypeError, ValueError):
        logger.warning("SOP Instance %s: Pixel Spacing is not two numbers; ignored",
                       ds.get("SOPInstanceUID", "?"))
        return None
    if not (math.isfinite(row) and math.isfinite(column) and row > 0 and column > 0):
        logger.warning("SOP Instance %s: Pixel Spacing %r is not positive; ignored",
                       ds.get("SOPInstanceUID", "?"), value)
        return None
    return row, column


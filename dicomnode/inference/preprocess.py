"""Pre-processing as a manifest's TensorInput declares it: the image -> one model tensor.

Order: find the field of view, crop a square around it (zero-padded where it leaves the image),
resize, pick the colour channels, normalise, cast, lay out. `Geometry` remembers the crop box
and the model size so post-processing can map outputs back onto the source frame.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from dicomnode.inference.fov import Box, crop_square, find_field_of_view, square_box
from dicomnode.registry.manifest import TensorInput

# ITU-R BT.601 luma, what most fundus "grey" pipelines use.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Geometry:
    """Where a model's input came from: `box` in source pixels, resized to `size` (h, w)."""

    source_shape: tuple[int, int]  # (H, W) of the decoded source
    box: Box
    size: tuple[int, int]
    pixel_spacing: tuple[float, float] | None = None  # source (row, column) mm, when known

    def to_dict(self) -> dict[str, object]:
        b = self.box
        return {
            "source_shape": list(self.source_shape),
            "box": [b.top, b.left, b.bottom, b.right],
            "size": list(self.size),
            "pixel_spacing": list(self.pixel_spacing) if self.pixel_spacing else None,
        }


@dataclass
class SourceImage:
    """One decoded instance; its field of view is found once and shared by every model."""

    sop_instance_uid: str
    rgb: NDArray[np.uint8]
    laterality: str | None = None
    pixel_spacing: tuple[float, float] | None = None  # (row, column) mm, from the header
    modality: str | None = None  # the instance's Modality; a model skips ones it does not take
    _fov_box: Box | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])

    def fov_square(self) -> Box:
        with self._lock:  # models of one stage ask at once; compute it once
            if self._fov_box is None:
                self._fov_box = square_box(find_field_of_view(self.rgb).box)
            return self._fov_box


def resize_rgb(image: NDArray[np.uint8], height: int, width: int) -> NDArray[np.uint8]:
    """Area-average when shrinking (no aliasing), bilinear when enlarging."""
    if image.shape[:2] == (height, width):
        return image
    shrinking = height < image.shape[0] and width < image.shape[1]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.array(Image.fromarray(image).resize((width, height), method))


def _channels(image: NDArray[np.uint8], colour: str) -> NDArray[np.float32]:
    rgb = image.astype(np.float32)
    if colour == "RGB":
        return rgb
    if colour == "BGR":
        return rgb[..., ::-1]
    if colour == "green":
        return rgb[..., 1:2]
    return (rgb @ _LUMA)[..., None]  # grey


def prepare(image: SourceImage, spec: TensorInput) -> tuple[NDArray[np.generic], Geometry]:
    """The tensor for one image (no batch axis) and the geometry that made it."""
    height, width = spec.size
    if spec.crop_fov:
        box = image.fov_square()
        cropped = crop_square(image.rgb, box)
    else:
        box = Box(0, 0, *image.shape)
        cropped = image.rgb
    resized = resize_rgb(np.ascontiguousarray(cropped, dtype=np.uint8), height, width)
    values = _channels(resized, spec.colour)
    norm = spec.normalisation
    mean = np.asarray(norm.mean, dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float32)
    values = (values * np.float32(norm.scale) - mean) / std
    if spec.layout == "NCHW":
        values = np.transpose(values, (2, 0, 1))
    if spec.dtype == "uint8":
        out: NDArray[np.generic] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        out = values.astype(spec.dtype)
    return np.ascontiguousarray(out), Geometry(image.shape, box, (height, width),
                                               image.pixel_spacing)

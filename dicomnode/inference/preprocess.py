"""Pre-processing as a manifest's TensorInput declares it: the image -> one model tensor.

Order: find the field of view, crop a square around it (zero-padded where it leaves the image),
resize, pick the colour channels, normalise, cast, lay out. `Geometry` remembers the crop box
and the model size so post-processing can map outputs back onto the source frame.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from dicomnode.inference.fov import Box, crop_square, field_of_view_box, square_box
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
    _pil: Image.Image | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])

    def fov_square(self) -> Box:
        with self._lock:  # models of one stage ask at once; compute it once
            if self._fov_box is None:
                self._fov_box = square_box(field_of_view_box(self.rgb))
            return self._fov_box

    def pil(self) -> Image.Image:
        """The pixels as one PIL image, made once and shared by every model's resize."""
        with self._lock:
            if self._pil is None:
                self._pil = Image.fromarray(np.ascontiguousarray(self.rgb, dtype=np.uint8))
            return self._pil

    def release(self) -> None:
        """Drop the PIL copy (4 bytes a pixel) once no pending model resizes this image."""
        with self._lock:
            self._pil = None


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


def _resized_crop(image: SourceImage, box: Box, height: int, width: int) -> NDArray[np.uint8]:
    """`resize_rgb(crop_square(image.rgb, box), height, width)`, without the crop's copies.

    The crop is cut from the image's shared PIL copy (PIL zero-pads a box that leaves the
    image, as crop_square does). Resizing the region in place (`resize(box=...)`) is not
    equal: PIL then places the filter differently at non-integer scales.
    """
    if (box.height, box.width) == (height, width):
        return np.ascontiguousarray(crop_square(image.rgb, box), dtype=np.uint8)
    shrinking = height < box.height and width < box.width
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    region = image.pil().crop((box.left, box.top, box.right, box.bottom))
    return np.asarray(region.resize((width, height), method))


def prepare_batch(
    images: Sequence[SourceImage], spec: TensorInput
) -> tuple[NDArray[np.generic], list[Geometry]]:
    """The stacked tensors for `images` (batch axis first) and each one's geometry: what
    `prepare` gives image by image, written straight into one array (tested equal)."""
    height, width = spec.size
    float_out = spec.dtype != "uint8" and spec.colour != "grey"
    if not float_out:  # rarely used: the reference path, image by image
        prepared = [prepare(image, spec) for image in images]
        return np.stack([p[0] for p in prepared]), [p[1] for p in prepared]
    sources = {"RGB": (0, 1, 2), "BGR": (2, 1, 0), "green": (1,)}[spec.colour]
    channels = len(sources)
    shape = ((len(images), channels, height, width) if spec.layout == "NCHW"
             else (len(images), height, width, channels))
    work = np.empty(shape, dtype=np.float32)
    norm = spec.normalisation
    scale = np.float32(norm.scale)
    mean = np.broadcast_to(np.asarray(norm.mean, dtype=np.float32), (channels,))
    std = np.broadcast_to(np.asarray(norm.std, dtype=np.float32), (channels,))
    geometries: list[Geometry] = []
    for index, image in enumerate(images):
        box = image.fov_square() if spec.crop_fov else Box(0, 0, *image.shape)
        resized = _resized_crop(image, box, height, width)
        for channel, source in enumerate(sources):
            plane = (work[index, channel] if spec.layout == "NCHW"
                     else work[index, :, :, channel])
            # The same float32 operations, in the same order, as `prepare`: equal bits.
            np.multiply(resized[..., source], scale, out=plane, dtype=np.float32)
            np.subtract(plane, mean[channel], out=plane)
            np.divide(plane, std[channel], out=plane)
        geometries.append(Geometry(image.shape, box, (height, width), image.pixel_spacing))
    out = work if spec.dtype == "float32" else work.astype(spec.dtype)
    return out, geometries

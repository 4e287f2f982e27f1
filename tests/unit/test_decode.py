"""Every transfer syntax the node accepts decodes to the same RGB picture.

One synthetic fundus is written uncompressed, then re-encoded by pydicom (RLE, JPEG 2000)
and by DCMTK (JPEG Baseline and JPEG Lossless, RLE); each file is read back from disk, as
the node would read a received file, and decoded with `decode_rgb`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)

from dicomnode.errors import DecodeError
from dicomnode.inference.decode import decode_rgb
from dicomnode.synthetic import op_dataset, synthetic_fundus
from tests.support.peers import require_tool

# Lossy codecs: the mean absolute error over all samples stays below this (0..255 scale).
# Measured on this picture (which carries sensor noise, the hardest part to compress):
# JPEG Baseline at DCMTK's default quality 90 with 4:2:2 chroma subsampling 2.26, JPEG 2000
# at 20:1 1.9. An undecoded YCbCr picture is about 79 off, so the margins stay meaningful.
BASELINE_MAE = 3.5
J2K_LOSSY_MAE = 3.5


@pytest.fixture(scope="module")
def picture() -> NDArray[np.uint8]:
    # Not square, so a transposed or reshaped decode cannot pass by accident.
    return np.ascontiguousarray(synthetic_fundus(256, "R", seed=11)[24:216])


@pytest.fixture()
def source(tmp_path: Path, picture: NDArray[np.uint8]) -> Path:
    path = tmp_path / "explicit.dcm"
    op_dataset(picture, laterality="R").save_as(path, enforce_file_format=True)
    return path


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def _implicit(src: Path, out: Path) -> Path:
    ds = _read(src)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return out


def _pydicom_compress(
    syntax: UID, photometric: str | None = None, **kwargs: object
) -> Callable[[Path, Path], Path]:
    def encode(src: Path, out: Path) -> Path:
        ds = _read(src)
        if photometric is not None:
            # pydicom applies JPEG 2000's colour transform when the target interpretation
            # is YBR_RCT / YBR_ICT (the pixel values given are still RGB).
            ds.PhotometricInterpretation = photometric
        ds.compress(syntax, **kwargs)  # type: ignore[arg-type]
        ds.save_as(out, enforce_file_format=True)
        return out

    return encode


def _dcmtk(tool: str, *options: str) -> Callable[[Path, Path], Path]:
    def encode(src: Path, out: Path) -> Path:
        exe = require_tool(tool, "dcmtk")
        subprocess.run([exe, *options, str(src), str(out)], check=True, timeout=60)
        return out

    return encode


def _mae(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


LOSSLESS: dict[str, tuple[UID, Callable[[Path, Path], Path]]] = {
    "implicit-le": (ImplicitVRLittleEndian, _implicit),
    "rle-pydicom": (RLELossless, _pydicom_compress(RLELossless)),
    "rle-dcmcrle": (RLELossless, _dcmtk("dcmcrle")),
    "jpeg-lossless-sv1-dcmcjpeg": (JPEGLosslessSV1, _dcmtk("dcmcjpeg")),
    "jpeg-lossless-57-dcmcjpeg": (JPEGLossless, _dcmtk("dcmcjpeg", "+el")),
    "j2k-lossless-rgb-pydicom": (JPEG2000Lossless, _pydicom_compress(JPEG2000Lossless)),
    "j2k-lossless-rct-pydicom": (
        JPEG2000Lossless, _pydicom_compress(JPEG2000Lossless, "YBR_RCT")
    ),
}

LOSSY: dict[str, tuple[UID, Callable[[Path, Path], Path], float, set[str]]] = {
    "jpeg-baseline-dcmcjpeg": (
        JPEGBaseline8Bit, _dcmtk("dcmcjpeg", "+eb"), BASELINE_MAE, {"YBR_FULL_422"}
    ),
    # Baseline without the YCbCr transform (some cameras): RGB components in the stream.
    "jpeg-baseline-rgb-dcmcjpeg": (
        JPEGBaseline8Bit, _dcmtk("dcmcjpeg", "+eb", "+cr"), BASELINE_MAE, {"RGB"}
    ),
    "jpeg-extended-dcmcjpeg": (
        JPEGExtended12Bit, _dcmtk("dcmcjpeg", "+ee"), BASELINE_MAE, {"YBR_FULL_422"}
    ),
    "j2k-lossy-pydicom": (
        JPEG2000,
        _pydicom_compress(JPEG2000, "YBR_ICT", j2k_cr=[20]),
        J2K_LOSSY_MAE,
        {"YBR_ICT"},
    ),
    "j2k-lossy-rgb-pydicom": (
        JPEG2000, _pydicom_compress(JPEG2000, j2k_cr=[20]), J2K_LOSSY_MAE, {"RGB"}
    ),
}


def test_explicit_little_endian_is_exact(source: Path, picture: NDArray[np.uint8]) -> None:
    ds = _read(source)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    decoded = decode_rgb(ds)
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded, picture)


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_syntaxes_decode_exactly(
    name: str, source: Path, tmp_path: Path, picture: NDArray[np.uint8]
) -> None:
    syntax, encode = LOSSLESS[name]
    ds = _read(encode(source, tmp_path / f"{name}.dcm"))
    assert ds.file_meta.TransferSyntaxUID == syntax  # the encoder did what we asked
    decoded = decode_rgb(ds)
    assert decoded.shape == picture.shape
    assert np.array_equal(decoded, picture), f"{name}: max diff {_mae(decoded, picture)}"


def test_j2k_lossless_uses_reversible_colour_transform(source: Path, tmp_path: Path) -> None:
    """The encoder really wrote YBR_RCT, so the exact result above covers the RCT path."""
    ds = _read(_pydicom_compress(JPEG2000Lossless, "YBR_RCT")(source, tmp_path / "rct.dcm"))
    assert ds.PhotometricInterpretation == "YBR_RCT"


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_lossy_syntaxes_decode_within_tolerance(
    name: str, source: Path, tmp_path: Path, picture: NDArray[np.uint8]
) -> None:
    syntax, encode, tolerance, photometric = LOSSY[name]
    ds = _read(encode(source, tmp_path / f"{name}.dcm"))
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.PhotometricInterpretation in photometric  # YCbCr really was in play
    decoded = decode_rgb(ds)
    assert decoded.shape == picture.shape
    error = _mae(decoded, picture)
    assert error < tolerance, f"{name}: mean abs error {error:.2f}"
    # Per channel too: a YCbCr image decoded without conversion fails here.
    for channel in range(3):
        assert _mae(decoded[..., channel], picture[..., channel]) < 2 * tolerance


@pytest.mark.filterwarnings("ignore:.*Photometric Interpretation.*:UserWarning")
def test_ycbcr_jpeg_labelled_rgb_still_decodes_to_rgb(
    source: Path, tmp_path: Path, picture: NDArray[np.uint8]
) -> None:
    """Cameras often label a JFIF (YCbCr) Baseline stream RGB; the stream's marker wins."""
    ds = _read(_dcmtk("dcmcjpeg", "+eb")(source, tmp_path / "mislabelled.dcm"))
    ds.PhotometricInterpretation = "RGB"
    assert _mae(decode_rgb(ds), picture) < BASELINE_MAE


def test_undecoded_ycbcr_would_fail_the_tolerance(picture: NDArray[np.uint8]) -> None:
    """The lossy thresholds are tight enough to catch a missing colour conversion."""
    from pydicom.pixels.processing import convert_color_space

    ybr = convert_color_space(picture, "RGB", "YBR_FULL")
    assert _mae(ybr, picture) > 10 * BASELINE_MAE


def _monochrome(picture: NDArray[np.uint8], photometric: str) -> Dataset:
    ds = op_dataset(picture, laterality="R")
    grey = picture[..., 1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    del ds.PlanarConfiguration
    ds.PixelData = grey.tobytes()
    return ds


def test_monochrome2_is_broadcast_to_three_channels(picture: NDArray[np.uint8]) -> None:
    decoded = decode_rgb(_monochrome(picture, "MONOCHROME2"))
    assert decoded.shape == picture.shape
    for channel in range(3):
        assert np.array_equal(decoded[..., channel], picture[..., 1])


def test_monochrome1_is_inverted(picture: NDArray[np.uint8]) -> None:
    decoded = decode_rgb(_monochrome(picture, "MONOCHROME1"))
    assert np.array_equal(decoded[..., 0], 255 - picture[..., 1])


def _sixteen_bit(picture: NDArray[np.uint8], bits_stored: int, shift: int) -> Dataset:
    ds = op_dataset(picture, laterality="R")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.2"  # OP 16 bit
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    # Each 8-bit value v becomes v << shift plus low bits, as a deeper sensor would give.
    wide = (picture.astype(np.uint16) << shift) | np.uint16((1 << shift) - 1 if shift else 0)
    ds.PixelData = wide.astype("<u2").tobytes()
    return ds


@pytest.mark.parametrize(("bits_stored", "shift"), [(16, 8), (12, 4), (10, 2)])
def test_sixteen_bit_scaled_by_bits_stored(
    picture: NDArray[np.uint8], bits_stored: int, shift: int
) -> None:
    decoded = decode_rgb(_sixteen_bit(picture, bits_stored, shift))
    assert decoded.dtype == np.uint8
    assert int(np.abs(decoded.astype(np.int16) - picture.astype(np.int16)).max()) <= 1


def test_sixteen_bit_using_only_low_bits_is_not_left_black(picture: NDArray[np.uint8]) -> None:
    """12-bit camera values in an OP claiming Bits Stored 16 still fill the 8-bit range."""
    decoded = decode_rgb(_sixteen_bit(picture, 16, 4))
    assert int(np.abs(decoded.astype(np.int16) - picture.astype(np.int16)).max()) <= 1


def test_multi_frame_gives_the_first_frame(picture: NDArray[np.uint8]) -> None:
    ds = op_dataset(picture, laterality="R")
    second = picture[::-1].copy()
    ds.NumberOfFrames = 2
    ds.PixelData = picture.tobytes() + second.tobytes()
    assert np.array_equal(decode_rgb(ds), picture)


def test_corrupt_jpeg_names_instance_and_syntax(source: Path, tmp_path: Path) -> None:
    ds = _read(_dcmtk("dcmcjpeg", "+eb")(source, tmp_path / "baseline.dcm"))
    frame = bytearray(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__())
    broken = bytes(frame[:40]) + b"\x00" * 16  # the stream stops inside its headers
    ds.PixelData = pydicom.encaps.encapsulate([broken])
    with pytest.raises(DecodeError) as info:
        decode_rgb(ds)
    message = str(info.value)
    assert ds.SOPInstanceUID in message
    assert str(JPEGBaseline8Bit) in message


def test_missing_pixel_data_is_a_decode_error(picture: NDArray[np.uint8]) -> None:
    ds = op_dataset(picture, laterality="R", sop_instance_uid="1.2.3.4.5")
    del ds.PixelData
    with pytest.raises(DecodeError, match=r"1\.2\.3\.4\.5.*Pixel Data"):
        decode_rgb(ds)


def test_truncated_native_pixel_data_is_a_decode_error(picture: NDArray[np.uint8]) -> None:
    ds = op_dataset(picture, laterality="R", sop_instance_uid="1.2.3.4.6")
    ds.PixelData = picture.tobytes()[:1000]
    with pytest.raises(DecodeError, match=r"1\.2\.3\.4\.6.*Explicit VR Little Endian"):
        decode_rgb(ds)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_sixteen_bit_matches_native(
    picture: NDArray[np.uint8], syntax: UID
) -> None:
    native = decode_rgb(_sixteen_bit(picture, 12, 4))
    ds = _sixteen_bit(picture, 12, 4)
    ds.compress(syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(decode_rgb(ds), native)


def test_palette_colour_goes_through_its_lookup_table(picture: NDArray[np.uint8]) -> None:
    ds = _monochrome(picture, "PALETTE COLOR")
    ramp = np.arange(256, dtype=np.uint16) * 257  # 16-bit LUT entries
    for colour, lut in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", ramp * 0)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    decoded = decode_rgb(ds)
    index = picture[..., 1]
    assert np.array_equal(decoded[..., 0], index)
    assert np.array_equal(decoded[..., 1], 255 - index)
    assert not decoded[..., 2].any()

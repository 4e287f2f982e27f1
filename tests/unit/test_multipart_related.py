"""The STOW-RS body splitter: parts come back byte for byte; broken bodies are named."""

from __future__ import annotations

import pytest

from dicomnode.web.multipart_related import MultipartError, parse_media_type, split


def test_parts_keep_their_bytes_and_headers() -> None:
    binary = bytes(range(256)) * 4 + b"\r\n--notboundary\r\n"
    body = (b"preamble to ignore\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + binary
            + b"\r\n--XyZ\r\ncontent-type: Application/DICOM; transfer-syntax=1.2\r\n\r\nB"
            + b"\r\n--XyZ--\r\nepilogue")
    parts = split(body, "XyZ")
    assert [p.content for p in parts] == [binary, b"B"]
    assert [p.content_type for p in parts] == ["application/dicom", "application/dicom"]


def test_media_type_parameters() -> None:
    media = parse_media_type('multipart/related; type="application/dicom"; boundary=abc')
    assert media.type == "multipart/related"
    assert media.params == {"type": "application/dicom", "boundary": "abc"}


@pytest.mark.parametrize(("body", "message"), [
    (b"no delimiter at all", "no part delimited"),
    (b"--B\r\nContent-Type: application/dicom\r\n\r\nunfinished", "close delimiter"),
    (b"--B\r\nContent-Type: application/dicom\r\nno blank line\r\n--B--", "no blank line"),
])
def test_broken_bodies_are_refused_with_the_reason(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        split(body, "B")

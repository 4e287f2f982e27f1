"""Split a `multipart/related` body (RFC 2387, as STOW-RS sends it) into its parts.

python-multipart only reads multipart/form-data; a STOW-RS body is a plain MIME multipart
whose parts are whole DICOM files, so it is split on its boundary here: bytes in, (headers,
content) out, the content untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser


class MultipartError(ValueError):
    """The body or its Content-Type is not a well-formed multipart message."""


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]  # names lower-cased
    content: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


@dataclass(frozen=True)
class MediaType:
    type: str  # e.g. multipart/related
    params: dict[str, str]  # names lower-cased, values unquoted


def parse_media_type(value: str) -> MediaType:
    message = Message()
    message["content-type"] = value
    params = {k.lower(): v for k, v in (message.get_params(header="content-type") or [])[1:]}
    return MediaType(message.get_content_type(), params)


def split(body: bytes, boundary: str) -> list[Part]:
    if not boundary or len(boundary) > 70:
        raise MultipartError("the boundary parameter is missing or longer than 70 characters")
    delimiter = b"--" + boundary.encode("latin-1")
    # The first delimiter may start the body or follow a preamble line.
    start = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter)
    if start < 0:
        raise MultipartError("the body holds no part delimited by its boundary")
    if start > 0:
        start += 2
    parts: list[Part] = []
    position = start + len(delimiter)
    separator = b"\r\n" + delimiter
    while True:
        if body[position:position + 2] == b"--":
            return parts  # the close delimiter
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise MultipartError("the body ends inside a delimiter line")
        next_delimiter = body.find(separator, line_end)
        if next_delimiter < 0:
            raise MultipartError("the body ends without its close delimiter (--boundary--)")
        raw = body[line_end + 2:next_delimiter]
        header_end = raw.find(b"\r\n\r\n")
        if raw.startswith(b"\r\n"):
            head, content = b"", raw[2:]
        elif header_end >= 0:
            head, content = raw[:header_end], raw[header_end + 4:]
        else:
            raise MultipartError(f"part {len(parts) + 1} has no blank line after its headers")
        headers = HeaderParser().parsestr(head.decode("latin-1"))
        parts.append(Part({k.lower(): str(v) for k, v in headers.items()}, content))
        position = next_delimiter + len(separator)

"""Keep patient data out of logs, audit rows and job errors.

Exceptions raised while reading a data set often quote its values: pydicom's
`BytesLengthException` prints the raw bytes of the element it could not parse, so a Patient's
Name sent with a wrong VR lands in the message. Whatever text reaches a log, an audit row or
a job's error goes through `safe_error` (or the `RedactingFormatter`), which keeps the
exception's type, the tags and the shape of the message and replaces every quoted literal.
"""

from __future__ import annotations

import copy
import logging
import re
import traceback
from types import TracebackType

# Quoted literals as Python prints them: b'...', '...', "..." (with escapes inside).
_QUOTED = re.compile(r"""[bB]?'(?:[^'\\\n]|\\.)*'|[bB]?"(?:[^"\\\n]|\\.)*\"""")
_PLACEHOLDER = "'…'"
_MAX_LENGTH = 2000


def scrub(text: str) -> str:
    """`text` with every quoted literal replaced, clipped to a sane length."""
    return _QUOTED.sub(_PLACEHOLDER, text)[:_MAX_LENGTH]


def safe_error(exc: BaseException) -> str:
    """'TypeName: message' with the values a data set may have put in the message removed."""
    message = scrub(str(exc))
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def scrubbed_record(record: logging.LogRecord) -> logging.LogRecord:
    """`record` itself if it is the node's own (its text is AE titles, UIDs, counts); for a
    library's record (pydicom's "Invalid value for VR IS: '<the value>'", a Python warning
    quoting the same) a copy whose message has every quoted literal replaced."""
    if record.name == "dicomnode" or record.name.startswith("dicomnode."):
        return record
    clean = copy.copy(record)
    clean.msg, clean.args = scrub(record.getMessage()), None
    return clean


class RedactingFormatter(logging.Formatter):
    """Formats tracebacks with scrubbed exception messages (the frames themselves are code),
    and libraries' messages scrubbed (`scrubbed_record`).

    The node's own log messages (AE titles, UIDs, counts) are left alone.
    """

    def format(self, record: logging.LogRecord) -> str:
        return super().format(scrubbed_record(record))

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        exc = ei[1]
        if exc is None:
            return super().formatException(ei)
        parts: list[str] = []
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            frames = "".join(traceback.format_tb(current.__traceback__))
            parts.append(f"Traceback (most recent call last):\n{frames}{safe_error(current)}")
            current = current.__cause__ or (
                None if current.__suppress_context__ else current.__context__)
        return "\n\nwhile handling the above, or caused by it:\n".join(reversed(parts))

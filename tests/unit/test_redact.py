"""Patient data stays out of logs and recorded errors: exception messages are scrubbed."""

from __future__ import annotations

import io
import logging

import pytest
from pydicom.dataelem import DataElement_from_raw, RawDataElement
from pydicom.tag import Tag

from dicomnode.redact import RedactingFormatter, safe_error, scrub


def _pydicom_error() -> Exception:
    """What pydicom raises for a Patient's Name sent with a numeric VR: it quotes the bytes."""
    raw = RawDataElement(Tag(0x00100010), "US", 9, b"Doe^Jane^", 0, False, True)
    try:
        DataElement_from_raw(raw).value  # noqa: B018 (the access raises)
    except Exception as exc:
        return exc
    pytest.fail("pydicom accepted a 9-byte US")


def test_pydicom_message_loses_the_value_keeps_the_tag() -> None:
    exc = _pydicom_error()
    assert "Doe^Jane" in str(exc)  # the premise: the raw message carries the name
    text = safe_error(exc)
    assert "Doe" not in text
    assert text.startswith(type(exc).__name__) and "(0010,0010)" in text


def test_scrub_replaces_every_quoted_literal() -> None:
    assert scrub("""got b'Doe^J' and "Smith" and 'x\\'y'""") == "got '…' and '…' and '…'"


def test_formatter_scrubs_tracebacks_and_their_causes() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    log = logging.getLogger("test-redact")
    log.addHandler(handler)
    log.propagate = False
    names = ["Doe^Jane", "Roe^Richard"]  # the source lines of the frames must not show them
    try:
        try:
            try:
                raise ValueError(f"bad value {names[0]!r}")
            except ValueError as inner:
                raise RuntimeError(f"wrapped {names[1]!r}") from inner
        except RuntimeError:
            log.exception("planning failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "planning failed" in text and "ValueError" in text and "RuntimeError" in text
    assert "Doe" not in text and "Roe" not in text
    assert "raise ValueError" in text  # the frames are kept

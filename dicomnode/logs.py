"""Log set-up for the command line: one handler on stderr, text or JSON lines, quiet peers.

Long-running commands (`serve`, `worker`) log at `logging.level`; one-shot commands log
warnings only, since their output is the answer (`-v` for INFO, `-vv` for DEBUG). Libraries
that log routine work at INFO (highdicom for every object it builds, pynetdicom for every PDU,
APScheduler for every job run) are held at WARNING: their INFO lines carry nothing an operator
acts on, and pynetdicom's would carry patient data.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

from dicomnode.redact import RedactingFormatter, scrubbed_record

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
THIRD_PARTY = ("highdicom", "pynetdicom", "apscheduler", "PIL", "uvicorn", "httpx",
               "multipart", "python_multipart", "onnx")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class JsonFormatter(RedactingFormatter):
    """One JSON object per line: time (ISO 8601 UTC), level, logger, message; exc if any
    (scrubbed: tracebacks quote exception messages, which may carry data set values)."""

    def format(self, record: logging.LogRecord) -> str:
        record = scrubbed_record(record)
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class _NodeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second set-up replaces it."""


def effective_level(configured: str, *, service: bool, verbose: int) -> int:
    """The root level: `configured` for services, WARNING for one-shot commands; each `-v`
    one step more detail."""
    base = _LEVELS.index(configured)
    if not service:
        base = max(base, _LEVELS.index("WARNING"))
    return getattr(logging, _LEVELS[max(0, base - verbose)])  # type: ignore[no-any-return]


def configure_logging(configured: str = "INFO", fmt: LogFormat = "text", *,
                      service: bool = False, verbose: int = 0) -> None:
    level = effective_level(configured, service=service, verbose=verbose)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _NodeHandler):
            root.removeHandler(handler)
    handler = _NodeHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else RedactingFormatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (pydicom's value checks quote the value) go through the handler, and
    # so through its scrubbing, instead of straight to stderr.
    logging.captureWarnings(True)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(max(logging.WARNING, level))

"""One time format for people and programs alike: ISO 8601 in UTC with `Z`, to the
millisecond (`2026-12-01T21:54:47.120Z`), in the CLI, the API and the console. Milliseconds,
so that two events of one second still sort in order as text."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(value: datetime | None) -> str | None:
    """A timestamp as `YYYY-MM-DDTHH:MM:SS.mmmZ`; a naive value is UTC (SQLite keeps none)."""
    if value is None:
        return None
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat(timespec="milliseconds").replace("+00:00", "Z")

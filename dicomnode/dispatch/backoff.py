"""Exponential backoff between delivery attempts."""

from __future__ import annotations

from datetime import timedelta

from dicomnode.settings import DispatchSettings


def retry_delay(settings: DispatchSettings, attempts: int) -> timedelta:
    """How long to wait after the `attempts`-th failed attempt (1-based) before the next."""
    exponent = max(0, attempts - 1)
    seconds = settings.first_delay_seconds * settings.factor**exponent
    return timedelta(seconds=min(seconds, settings.max_delay_seconds))

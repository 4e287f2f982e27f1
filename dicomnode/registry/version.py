"""Model versions: semver-ish strings and their ordering ("latest" = highest)."""

from __future__ import annotations

import re

# 1, 1.2, 1.2.3, optionally with -prerelease and/or +build: enough for model releases.
VERSION_PATTERN = re.compile(
    r"^(?P<release>\d+(?:\.\d+){0,2})(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+(?P<build>[0-9A-Za-z.-]+))?$"
)
LATEST = "latest"


def is_valid_version(text: str) -> bool:
    return text != LATEST and VERSION_PATTERN.match(text) is not None


def version_key(text: str) -> tuple[tuple[int, int, int], int, tuple[tuple[int, int | str], ...]]:
    """Sort key: numeric release, then a release above its pre-releases (as in semver).

    Build metadata does not order; ties between equal keys are broken by callers on the text.
    """
    match = VERSION_PATTERN.match(text)
    if match is None:
        raise ValueError(f"'{text}' is not a version such as 1.2.0")
    numbers = [int(part) for part in match.group("release").split(".")]
    while len(numbers) < 3:
        numbers.append(0)
    pre = match.group("pre")
    if pre is None:
        return (numbers[0], numbers[1], numbers[2]), 1, ()
    # Numeric identifiers order numerically and below alphanumeric ones (semver rule 11).
    parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (numbers[0], numbers[1], numbers[2]), 0, parts


def sort_versions(versions: list[str] | set[str] | tuple[str, ...]) -> list[str]:
    """Oldest first; equal keys (1.0 and 1.0.0) by text so the order is deterministic."""
    return sorted(versions, key=lambda v: (version_key(v), v))

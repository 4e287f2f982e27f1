"""A cheap fingerprint of the catalog's folders (model registry and presets), so a watcher can
tell that something changed without loading models or parsing presets.

Each file the loaders would read is stamped with its size and mtime (nanoseconds); small text
files (manifests, presets, cards) also with a hash of their content, because an editor can
rewrite a file within the mtime's resolution and keep its size. ONNX files are stamped by size
and mtime only: hashing hundreds of megabytes every few seconds is not cheap.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.routing.loader import PRESET_SUFFIXES
from dicomnode.settings import Settings

# Content is hashed for these (manifests, presets, model cards), when below HASH_LIMIT bytes.
HASHED_SUFFIXES = frozenset({".yaml", ".yml", ".md", ".json", ".txt"})
HASH_LIMIT = 1 << 20
# <registry>/<model id>/<version>/<files>: deeper folders (external data) are stamped too.
_REGISTRY_DEPTH = 4


@dataclass(frozen=True)
class Stamp:
    size: int
    mtime_ns: int
    digest: str = ""  # "" when the content is not hashed (large or binary files, folders)


@dataclass(frozen=True)
class FolderPrint:
    """One folder's stamps by relative path (folders end in '/'); `exists` False if missing."""

    exists: bool
    stamps: Mapping[str, Stamp] = field(default_factory=dict)

    def changes(self, newer: FolderPrint) -> list[str]:
        """'+path', '-path', '~path' for files added, removed and changed (for the log)."""
        old, new = self.stamps, newer.stamps
        out = [f"+{p}" for p in sorted(new.keys() - old.keys())]
        out += [f"-{p}" for p in sorted(old.keys() - new.keys())]
        out += [f"~{p}" for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
        return out


@dataclass(frozen=True)
class CatalogPrint:
    registry: FolderPrint
    presets: FolderPrint

    def changes(self, newer: CatalogPrint) -> list[str]:
        return ([f"registry {c}" for c in self.registry.changes(newer.registry)]
                + [f"presets {c}" for c in self.presets.changes(newer.presets)])


def catalog_print(settings: Settings) -> CatalogPrint:
    return CatalogPrint(
        registry=folder_print(settings.registry.path, depth=_REGISTRY_DEPTH),
        presets=folder_print(settings.presets.path, depth=1, suffixes=PRESET_SUFFIXES),
    )


def folder_print(
    root: Path, *, depth: int, suffixes: tuple[str, ...] | None = None
) -> FolderPrint:
    """Stamp the non-hidden files under `root` (as the loaders skip hidden names, so do we:
    an editor's swap file or a half-copied `.tmp` must not count as a change)."""
    if not root.is_dir():
        return FolderPrint(False)
    stamps: dict[str, Stamp] = {}
    for relative, entry in _walk(root, "", depth):
        try:
            if entry.is_dir(follow_symlinks=True):
                # Folders count by name only (their mtime moves with every temporary file);
                # with a suffix filter (presets) the loader ignores folders altogether.
                if suffixes is None:
                    stamps[relative + "/"] = Stamp(0, 0)
                continue
            if suffixes is not None and not entry.name.endswith(suffixes):
                continue
            info = entry.stat(follow_symlinks=True)
            digest = ""
            if Path(entry.name).suffix in HASHED_SUFFIXES and info.st_size <= HASH_LIMIT:
                digest = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
            stamps[relative] = Stamp(info.st_size, info.st_mtime_ns, digest)
        except OSError:
            # Gone (or unreadable) between listing and reading: the next tick sees it settled.
            continue
    return FolderPrint(True, stamps)


def _walk(root: Path, prefix: str, depth: int) -> Iterator[tuple[str, os.DirEntry[str]]]:
    try:
        with os.scandir(root) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        relative = prefix + entry.name
        yield relative, entry
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            continue
        if is_dir and depth > 1:
            yield from _walk(Path(entry.path), relative + "/", depth - 1)

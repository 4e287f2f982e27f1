"""The registry: the models that passed their checks, by id and version, and those left out.

`build_registry` does the checks that need several manifests (references, cascading
exclusions); `loader.load_registry` reads a folder, checks each file and calls it. Tests and
tools can build a registry from manifests in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dicomnode.errors import RegistryLookupError
from dicomnode.registry.manifest import Manifest, input_source_problem
from dicomnode.registry.version import LATEST, sort_versions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """One accepted (or candidate) model version and where it lives."""

    manifest: Manifest
    directory: Path | None = None  # None for registries built in memory

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def manifest_path(self) -> Path | None:
        return None if self.directory is None else self.directory / "manifest.yaml"

    @property
    def onnx_path(self) -> Path | None:
        return None if self.directory is None else self.directory / self.manifest.file

    @property
    def card_path(self) -> Path | None:
        card = self.manifest.provenance.card
        return None if self.directory is None or card is None else self.directory / card


@dataclass(frozen=True)
class LeftOut:
    """A model version the registry refused, and why. `id` may be a folder name if unreadable."""

    id: str
    version: str | None
    file: Path | None
    reason: str

    @property
    def label(self) -> str:
        return self.id if self.version is None else f"{self.id}@{self.version}"

    def __str__(self) -> str:
        where = f" ({self.file})" if self.file is not None else ""
        return f"{self.label}{where}: {self.reason}"


def parse_model_ref(text: str) -> tuple[str, str | None]:
    """'vessel-seg' -> ('vessel-seg', None); 'vessel-seg@1.2.0' -> (..., '1.2.0').

    '@latest' is the same as no version.
    """
    model_id, sep, version = text.strip().partition("@")
    if sep and not version:
        raise RegistryLookupError(f"'{text}': a version must follow '@' (e.g. {model_id}@1.0.0)")
    return model_id, (None if not sep or version == LATEST else version)


class Registry:
    """Accepted models by id and version, plus what was left out. Read-only once built."""

    def __init__(
        self,
        entries: Mapping[str, Mapping[str, ModelEntry]],
        left_out: Iterable[LeftOut] = (),
        root: Path | None = None,
    ) -> None:
        self._entries = {mid: dict(versions) for mid, versions in entries.items() if versions}
        self.left_out: tuple[LeftOut, ...] = tuple(
            sorted(left_out, key=lambda lo: (lo.id, lo.version or "", lo.reason))
        )
        self.root = root

    def ids(self) -> list[str]:
        """Ids with at least one accepted version."""
        return sorted(self._entries)

    def known_ids(self) -> list[str]:
        """Accepted ids and ids whose every version was left out."""
        return sorted(set(self._entries) | {lo.id for lo in self.left_out})

    def versions(self, model_id: str) -> list[str]:
        """Accepted versions, oldest first."""
        return sort_versions(list(self._entries.get(model_id, {})))

    def has(self, model_id: str, version: str | None = None) -> bool:
        versions = self._entries.get(model_id, {})
        return bool(versions) if version is None else version in versions

    def get(self, model_id: str, version: str | None = None) -> ModelEntry:
        """The entry for id at version, or at its latest accepted version when none is given."""
        versions = self._entries.get(model_id)
        if version == LATEST:
            version = None
        if not versions:
            reasons = self.left_out_reasons(model_id)
            if reasons:
                raise RegistryLookupError(f"model '{model_id}' was left out: {reasons[0]}")
            raise RegistryLookupError(
                f"no model '{model_id}' in the registry (known: {', '.join(self.ids()) or 'none'})"
            )
        if version is None:
            return versions[sort_versions(list(versions))[-1]]
        if version not in versions:
            reasons = self.left_out_reasons(model_id, version)
            if reasons:
                raise RegistryLookupError(
                    f"model '{model_id}@{version}' was left out: {reasons[0]}"
                )
            raise RegistryLookupError(
                f"model '{model_id}' has no version {version} (versions: "
                f"{', '.join(self.versions(model_id))})"
            )
        return versions[version]

    def lookup(self, ref: str) -> ModelEntry:
        """Look up 'id' or 'id@version'."""
        model_id, version = parse_model_ref(ref)
        return self.get(model_id, version)

    def entries(self) -> list[ModelEntry]:
        """Every accepted version, by id then version."""
        return [self._entries[mid][v] for mid in self.ids() for v in self.versions(mid)]

    def latest_entries(self) -> list[ModelEntry]:
        return [self.get(mid) for mid in self.ids()]

    def left_out_reasons(self, model_id: str, version: str | None = None) -> list[str]:
        return [
            lo.reason
            for lo in self.left_out
            if lo.id == model_id and (version is None or lo.version == version)
        ]

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())


def build_registry(
    candidates: Iterable[ModelEntry],
    left_out: Iterable[LeftOut] = (),
    root: Path | None = None,
) -> Registry:
    """Check references between candidates and leave out what cannot work.

    Repeats until nothing changes, because leaving one model out can strand its dependants.
    """
    refused = list(left_out)
    accepted: dict[str, dict[str, ModelEntry]] = {}
    for entry in candidates:
        if entry.version in accepted.get(entry.id, {}):
            refused.append(
                LeftOut(entry.id, entry.version, entry.manifest_path, "duplicate id and version")
            )
            continue
        accepted.setdefault(entry.id, {})[entry.version] = entry
    known = set(accepted) | {lo.id for lo in refused}
    changed = True
    while changed:
        changed = False
        for model_id in sorted(accepted):
            for version in sort_versions(list(accepted[model_id])):
                entry = accepted[model_id][version]
                reason = _reference_problem(entry.manifest, accepted, known, refused)
                if reason is None:
                    continue
                logger.warning("model %s left out: %s", entry.key, reason)
                refused.append(LeftOut(model_id, version, entry.manifest_path, reason))
                del accepted[model_id][version]
                changed = True
            if not accepted[model_id]:
                del accepted[model_id]
    return Registry(accepted, refused, root)


def _unavailable(
    model_id: str, accepted: Mapping[str, Mapping[str, ModelEntry]], refused: list[LeftOut]
) -> str:
    reasons = [lo for lo in refused if lo.id == model_id]
    if reasons:
        return f"{model_id} was left out ({reasons[0].label}: {reasons[0].reason})"
    return f"{model_id} is not in the registry"


def _reference_problem(
    manifest: Manifest,
    accepted: Mapping[str, Mapping[str, ModelEntry]],
    known: set[str],
    refused: list[LeftOut],
) -> str | None:
    for name in manifest.conflicts:
        if name not in known:
            return f"conflicts names unknown model '{name}'"
    for name in manifest.requires:
        if name not in known:
            return f"requires unknown model '{name}'"
        if name not in accepted:
            return f"requires {_unavailable(name, accepted, refused)}"
    for spec in manifest.upstream_inputs:
        usable = []
        problems = []
        for ref in spec.sources:
            if ref.model not in known:
                return f"input '{spec.name}' takes from unknown model '{ref.model}'"
            if ref.model not in accepted:
                problems.append(_unavailable(ref.model, accepted, refused))
                continue
            source = accepted[ref.model][sort_versions(list(accepted[ref.model]))[-1]].manifest
            problem = input_source_problem(spec, ref, source)
            if problem is not None:
                return problem
            usable.append(ref)
        if not usable:
            return f"input '{spec.name}' has no source: {'; '.join(problems)}"
    return None

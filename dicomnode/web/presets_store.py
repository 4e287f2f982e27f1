"""Preset changes from the console and API: validate, write atomically, keep a revision, audit,
reload the catalog so the change takes effect without a restart.

The text written is checked with the same parser the loader uses (`parse_preset`), so a file
this module writes always loads. A refused change leaves the file untouched.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError
from sqlalchemy import select

from dicomnode import yaml_edit
from dicomnode.db.audit import record
from dicomnode.db.models import PresetRevision
from dicomnode.durable import fsync_path, write_text_atomic
from dicomnode.errors import DicomNodeError, PresetError
from dicomnode.routing import Preset, dump_preset, parse_preset, validate_preset_data
from dicomnode.routing.preset import PRESET_ID_PATTERN
from dicomnode.timefmt import iso_utc
from dicomnode.web.state import WebState

logger = logging.getLogger(__name__)


class PresetConflict(DicomNodeError):
    """The change cannot be made in the current state (exists already, in use, id mismatch)."""


class PresetMissing(DicomNodeError):
    """No preset (loaded or refused file) with that id."""


class PresetStale(DicomNodeError):
    """The file changed since the editor read it (If-Match differs): reload before saving."""


def content_tag(text: str | None) -> str | None:
    """A short fingerprint of a preset file's text, for If-Match (no lost updates)."""
    if text is None:
        return None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_tag(state: WebState, preset_id: str) -> str | None:
    return content_tag(_read(preset_path(state, preset_id)))


@dataclass(frozen=True)
class Change:
    preset_id: str
    action: str
    path: Path
    diff: str
    revision: int
    etag: str | None = None


def validate(state: WebState, data: Any) -> Preset:
    """Schema and catalog checks (models, destinations, resolution); raises PresetError."""
    settings = state.settings
    catalog = state.catalog.catalog
    preset = validate_preset_data(
        data, registry=catalog.registry, destinations=set(settings.destinations)
    )
    # And the exact text that would be written, through the loader's own parser.
    parse_preset(dump_preset(preset), None, registry=catalog.registry,
                 destinations=set(settings.destinations))
    return preset


def preset_path(state: WebState, preset_id: str) -> Path | None:
    """The file that holds a preset: the loaded one's, or <id>.yaml if it exists (refused)."""
    if not PRESET_ID_PATTERN.match(preset_id):  # never a path outside the presets folder
        return None
    catalog = state.catalog.catalog
    loaded = catalog.presets.files.get(preset_id)
    if loaded is not None:
        return loaded
    for suffix in (".yaml", ".yml"):
        candidate = state.settings.presets.path / f"{preset_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def unified_diff(preset_id: str, before: str | None, after: str | None) -> str:
    lines = difflib.unified_diff(
        (before or "").splitlines(keepends=True), (after or "").splitlines(keepends=True),
        fromfile=f"{preset_id}.yaml (before)", tofile=f"{preset_id}.yaml (after)",
    )
    return "".join(lines)


def _read(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return path.read_text(encoding="utf-8")


def _restore(path: Path, previous: str | None) -> None:
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        write_text_atomic(path, previous)


def _commit(
    state: WebState, preset_id: str, action: str, actor: str, path: Path,
    previous: str | None, content: str | None,
) -> Change:
    """Revision row + audit row + file change in one unit: the file is changed inside the
    transaction, and put back if the commit fails."""
    diff = unified_diff(preset_id, previous, content)
    try:
        with state.database.transaction() as session:
            revision = PresetRevision(
                preset_id=preset_id, action=action, actor=actor,
                previous=previous, content=content,
            )
            session.add(revision)
            session.flush()
            record(session, f"preset-{action}", actor=actor,
                   detail=f"preset {preset_id} ({path.name})\n{diff}")
            if content is None:
                path.unlink()
                fsync_path(path.parent)
            else:
                write_text_atomic(path, content)
            revision_id = revision.id
    except BaseException:
        if _read(path) != previous:
            _restore(path, previous)
        raise
    state.catalog.reload()
    logger.info("preset %s %sd by %s (%s)", preset_id, action, actor, path)
    return Change(preset_id, action, path, diff, revision_id, content_tag(content))


def edited_text(previous: str | None, preset: Preset) -> str:
    """The file's new text: the old text with only the changed fields edited (comments, key
    order and style kept); a fresh dump when there is no old text or it does not parse."""
    fresh = dump_preset(preset)
    if previous is None:
        return fresh
    try:
        before = parse_preset(previous, None, registry=None, destinations=None)
        yaml, document = yaml_edit.load(previous)
        if not isinstance(document, CommentedMap):
            return fresh
        yaml_edit.merge(document, before.model_dump(mode="json"), preset.model_dump(mode="json"),
                        preset.model_dump(mode="json", exclude_defaults=True))
        text = yaml_edit.dump(yaml, document)
        # The edit must say exactly what was validated; if not, the plain dump does.
        if parse_preset(text, None, registry=None, destinations=None) != preset:
            logger.warning("preset %s: editing the file in place changed its meaning; "
                           "writing it afresh", preset.id)
            return fresh
    except (PresetError, YAMLError) as exc:
        logger.info("preset %s: old text not editable in place (%s); writing it afresh",
                    preset.id, exc)
        return fresh
    return text


def create(state: WebState, data: Mapping[str, Any], actor: str) -> Change:
    with state.preset_lock:
        preset = validate(state, dict(data))
        if preset.id in state.catalog.catalog.presets.presets or preset_path(state, preset.id):
            raise PresetConflict(f"preset '{preset.id}' exists already; update it instead")
        path = state.settings.presets.path / f"{preset.id}.yaml"
        return _commit(state, preset.id, "create", actor, path, None, dump_preset(preset))


def update(
    state: WebState, preset_id: str, data: Mapping[str, Any], actor: str,
    if_match: str | None = None,
) -> Change:
    with state.preset_lock:
        path = preset_path(state, preset_id)
        if path is None:
            raise PresetMissing(f"no preset '{preset_id}'")
        if if_match is not None and content_tag(_read(path)) != if_match.strip('"'):
            raise PresetStale(
                f"preset '{preset_id}' was changed since you opened it (see Audit); "
                "reload the page and make your change again"
            )
        if data.get("id", preset_id) != preset_id:
            raise PresetConflict(
                f"the body's id '{data.get('id')}' differs from '{preset_id}'; "
                "save under a new id with POST /api/presets"
            )
        preset = validate(state, {**data, "id": preset_id})
        previous = _read(path)
        return _commit(state, preset_id, "update", actor, path, previous,
                       edited_text(previous, preset))


def delete(state: WebState, preset_id: str, actor: str) -> Change:
    with state.preset_lock:
        path = preset_path(state, preset_id)
        if path is None:
            raise PresetMissing(f"no preset '{preset_id}'")
        users = [m for m, p in state.settings.modality_defaults.items() if p == preset_id]
        if users:
            raise PresetConflict(
                f"preset '{preset_id}' is the settings' modality default for "
                f"{', '.join(sorted(users))}; change modality_defaults first"
            )
        return _commit(state, preset_id, "delete", actor, path, _read(path), None)


def revisions(state: WebState, preset_id: str | None = None, limit: int = 200
              ) -> list[dict[str, Any]]:
    with state.database.transaction() as session:
        query = select(PresetRevision).order_by(PresetRevision.id.desc()).limit(limit)
        if preset_id is not None:
            query = query.where(PresetRevision.preset_id == preset_id)
        return [
            {
                "id": r.id, "preset": r.preset_id, "action": r.action, "actor": r.actor,
                "at": iso_utc(r.at),
                "diff": unified_diff(r.preset_id, r.previous, r.content),
            }
            for r in session.scalars(query)
        ]


def problems_as_list(exc: PresetError) -> list[dict[str, Any]]:
    out = []
    for problem in exc.problems:
        to_dict = getattr(problem, "to_dict", None)
        out.append(to_dict() if callable(to_dict) else {"message": str(problem)})
    return out or [{"message": str(exc)}]

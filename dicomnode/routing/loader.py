"""Load and check presets: every problem names the file, the line where known, and the field.

A folder with some bad presets still yields the good ones; the bad ones are reported. Checks
that need the outside world: the models exist in the registry (pinned versions too), the
combination resolves for the preset's modalities, and the destinations exist in the settings.
"""

from __future__ import annotations

import logging
import types
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dicomnode.errors import PresetError, ResolutionError
from dicomnode.graph.resolver import resolve
from dicomnode.graph.selection import Selection
from dicomnode.registry.registry import Registry, parse_model_ref
from dicomnode.routing.preset import Preset
from dicomnode.routing.yaml_lines import LocatedYaml, YamlProblem, load_located

logger = logging.getLogger(__name__)

PRESET_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class PresetProblem:
    file: Path | None
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = str(self.file) if self.file is not None else "<preset>"
        if self.line is not None:
            where += f":{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": None if self.file is None else str(self.file),
            "line": self.line,
            "field": self.field,
            "message": self.message,
        }


@dataclass
class PresetSet:
    """The presets that loaded, where each came from, and what was refused."""

    presets: dict[str, Preset] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    problems: list[PresetProblem] = field(default_factory=list)

    def get(self, preset_id: str) -> Preset:
        preset = self.presets.get(preset_id)
        if preset is not None:
            return preset
        refused = [p for p in self.problems if p.file is not None and p.file.stem == preset_id]
        hint = f"; refused: {refused[0]}" if refused else ""
        raise PresetError(
            f"no preset '{preset_id}' (loaded: {', '.join(sorted(self.presets)) or 'none'}){hint}"
        )

    def ordered(self) -> list[Preset]:
        return [self.presets[k] for k in sorted(self.presets)]


def _raise(problems: Sequence[PresetProblem]) -> typing.NoReturn:
    raise PresetError("; ".join(str(p) for p in problems), tuple(problems))


def parse_preset(
    text: str,
    file: Path | None = None,
    *,
    registry: Registry | None,
    destinations: Collection[str] | None,
) -> Preset:
    """Parse and check one preset. `registry`/`destinations` None skip those checks."""
    try:
        located = load_located(text)
    except YamlProblem as exc:
        _raise([PresetProblem(file, exc.line, None, str(exc))])
    if not isinstance(located.data, dict):
        _raise([PresetProblem(file, 1, None, "a preset is a mapping of fields (id, name, ...)")])
    try:
        preset = Preset.model_validate(located.data)
    except ValidationError as exc:
        _raise(_schema_problems(exc, located, file))
    problems = check_preset(preset, located, file, registry=registry, destinations=destinations)
    if problems:
        _raise(problems)
    return preset


def validate_preset_data(
    data: Any,
    *,
    registry: Registry | None,
    destinations: Collection[str] | None,
    source: Path | None = None,
) -> Preset:
    """Check a preset given as data (e.g. JSON from the console); problems name the field."""
    if not isinstance(data, dict):
        _raise([PresetProblem(source, None, None, "a preset is a mapping of fields")])
    try:
        preset = Preset.model_validate(data)
    except ValidationError as exc:
        _raise(_schema_problems(exc, None, source))
    problems = check_preset(preset, None, source, registry=registry, destinations=destinations)
    if problems:
        _raise(problems)
    return preset


def dump_preset(preset: Preset) -> str:
    """YAML text for a preset, fields in schema order, defaults left out; parses back equal."""
    data = preset.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def load_preset_file(
    path: Path, *, registry: Registry | None, destinations: Collection[str] | None
) -> Preset:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        _raise([PresetProblem(path, None, None, f"cannot read: {exc.strerror}")])
    except UnicodeDecodeError:
        _raise([PresetProblem(path, None, None, "not UTF-8 text")])
    return parse_preset(text, path, registry=registry, destinations=destinations)


def preset_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.suffix in PRESET_SUFFIXES and not p.name.startswith(".")
    )


def load_presets(
    directory: Path, *, registry: Registry | None, destinations: Collection[str] | None
) -> PresetSet:
    """Load every preset file in a folder; never raises for a bad preset."""
    result = PresetSet()
    if not directory.is_dir():
        logger.warning("preset folder %s does not exist: no presets", directory)
        return result
    return load_preset_paths(
        preset_files(directory), registry=registry, destinations=destinations
    )


def load_preset_paths(
    paths: Sequence[Path], *, registry: Registry | None, destinations: Collection[str] | None
) -> PresetSet:
    result = PresetSet()
    for path in paths:
        try:
            preset = load_preset_file(path, registry=registry, destinations=destinations)
        except PresetError as exc:
            problems = [p for p in exc.problems if isinstance(p, PresetProblem)]
            for problem in problems:
                logger.warning("preset refused: %s", problem)
            result.problems.extend(problems)
            continue
        if preset.id in result.presets:
            problem = PresetProblem(
                path, 1, "id", f"preset id '{preset.id}' is already defined in "
                f"{result.files[preset.id]}"
            )
            logger.warning("preset refused: %s", problem)
            result.problems.append(problem)
            continue
        result.presets[preset.id] = preset
        result.files[preset.id] = path
    logger.info("presets: %d loaded, %d problems", len(result.presets), len(result.problems))
    return result


# --- problems ---------------------------------------------------------------------------------


def _loc_text(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text or "(top level)"


def _schema_problems(
    exc: ValidationError, located: LocatedYaml | None, file: Path | None
) -> list[PresetProblem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        message = str(err["msg"])
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            message = f"unknown key '{loc[-1]}'" + (
                f" (allowed here: {', '.join(allowed)})" if allowed else ""
            )
        elif err["type"] == "missing":
            message = "required field is missing"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        line = located.line_for(loc) if located is not None else None
        problems.append(PresetProblem(file, line, _loc_text(loc), message))
    return problems


def _allowed_keys(loc: Sequence[int | str]) -> list[str]:
    """The field names of the schema object at loc, for 'unknown key' messages."""
    current: type[BaseModel] | None = Preset
    for part in loc:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part)
        current = _model_in(info.annotation) if info is not None else None
    return sorted(current.model_fields) if current is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def check_preset(
    preset: Preset,
    located: LocatedYaml | None,
    file: Path | None,
    *,
    registry: Registry | None,
    destinations: Collection[str] | None,
) -> list[PresetProblem]:
    """Problems that need the registry or the settings; empty when the preset is usable."""

    def problem(path: tuple[str | int, ...], message: str) -> PresetProblem:
        line = located.line_for(path) if located is not None else None
        return PresetProblem(file, line, _loc_text(path), message)

    problems: list[PresetProblem] = []
    overlap = sorted(set(preset.model_ids) & set(preset.optional_ids))
    if overlap:
        problems.append(problem(("optional_models",), f"also in models: {overlap}"))
    if destinations is not None:
        for index, name in enumerate(preset.destinations):
            if name not in destinations:
                problems.append(
                    problem(
                        ("destinations", index),
                        f"destination '{name}' is not defined in the settings' destinations "
                        f"(defined: {', '.join(sorted(destinations)) or 'none'})",
                    )
                )
    if registry is None:
        return problems
    model_problems = []
    for key, refs in (("models", preset.models), ("optional_models", preset.optional_models)):
        for index, ref in enumerate(refs):
            message = _model_problem(ref, registry)
            if message is not None:
                model_problems.append(problem((key, index), message))
    problems.extend(model_problems)
    if model_problems:
        return problems
    # The combination itself must resolve, for each modality the preset routes.
    modalities: list[str | None] = list(preset.routing.modality) or [None]
    for modality in modalities:
        try:
            resolve(Selection.of(preset.models, modality=modality, preset=preset.id), registry)
        except ResolutionError as exc:
            suffix = f" (for modality {modality})" if modality else ""
            problems.append(problem(("models",), f"the models do not resolve{suffix}: {exc}"))
            break
    return problems


def _model_problem(ref: str, registry: Registry) -> str | None:
    model_id, version = parse_model_ref(ref)
    if model_id not in registry.known_ids():
        return (
            f"unknown model '{model_id}' (the registry has: "
            f"{', '.join(registry.ids()) or 'no models'})"
        )
    if not registry.has(model_id):
        reason = registry.left_out_reasons(model_id)[0]
        return f"model '{model_id}' was left out by the registry: {reason}"
    if version is not None and not registry.has(model_id, version):
        reasons = registry.left_out_reasons(model_id, version)
        if reasons:
            return f"model '{model_id}@{version}' was left out by the registry: {reasons[0]}"
        return (
            f"model '{model_id}' has no version {version} (versions: "
            f"{', '.join(registry.versions(model_id))}); pin one of those or drop '@{version}'"
        )
    return None

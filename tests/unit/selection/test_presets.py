"""Preset loading: valid presets load; each problem names file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dicomnode.errors import PresetError
from dicomnode.registry import Registry
from dicomnode.routing import dump_preset, load_presets, parse_preset, validate_preset_data
from dicomnode.routing.loader import PresetProblem

GOOD = """\
id: screening
name: Diabetic screening
audience: primary care
description: Quality gate, then the green segmentation and its area fraction.
models:
  - mask-fraction
  - green-seg@1.0.0
optional_models: [mask-centre]
outputs: {sr: true, seg: true, overlay: false}
destinations: [pacs]
completeness: {expected_laterality: [L, R], quiet_seconds: 30}
routing:
  modality: OP
  calling_ae: [CAM1, CAM2]
  tags:
    - {tag: StudyDescription, regex: "(?i)screen"}
    - {tag: "0008,1090", regex: "^TRC"}
priority: 10
enabled: true
"""
DESTINATIONS = {"pacs"}


def _problem(text: str, registry: Registry | None, destinations: set[str] | None = DESTINATIONS,
             ) -> PresetProblem:
    with pytest.raises(PresetError) as info:
        parse_preset(text, Path("p.yaml"), registry=registry, destinations=destinations)
    problems = [p for p in info.value.problems if isinstance(p, PresetProblem)]
    assert problems, "a refusal carries its problems"
    assert str(info.value).startswith("p.yaml")
    return problems[0]


def test_good_preset_loads(registry: Registry) -> None:
    preset = parse_preset(GOOD, Path("p.yaml"), registry=registry, destinations=DESTINATIONS)
    assert preset.id == "screening"
    assert preset.routing.modality == ["OP"]  # a single value is a list of one
    assert preset.routing.tags[1].tag_key == "00081090"
    assert preset.model_ids == ["mask-fraction", "green-seg"]


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "message"),
    [
        ("priority: 10", "priority: 10\ncolour: red", 19, "colour", "unknown key 'colour'"),
        ("  modality: OP", "  modality: OP\n  camera: x", 14, "routing.camera",
         "unknown key 'camera' (allowed here: body_part, called_ae"),
        ("  - green-seg@1.0.0", "  - green-seg@9.0.0", 7, "models[1]",
         "model 'green-seg' has no version 9.0.0 (versions: 1.0.0, 1.1.0)"),
        ("  - mask-fraction", "  - mask-fractoin", 6, "models[0]",
         "unknown model 'mask-fractoin' (the registry has: green-quality"),
        ("destinations: [pacs]", "destinations: [pacs, archive]", 10, "destinations[1]",
         "destination 'archive' is not defined in the settings' destinations (defined: pacs)"),
        ('regex: "^TRC"', 'regex: "^TRC("', 17, "routing.tags[1].regex",
         "not a valid regular expression"),
        ("tag: StudyDescription", "tag: StudyDescriptoin", 16, "routing.tags[0].tag",
         "'StudyDescriptoin' is neither a DICOM keyword"),
        ("priority: 10", "priority: high", 18, "priority", "valid integer"),
        ("name: Diabetic screening\n", "", 1, "name", "required field is missing"),
        ("optional_models: [mask-centre]", "optional_models: [mask-fraction]", 8,
         "optional_models", "also in models: ['mask-fraction']"),
        ("  modality: OP", "  modality: OP\n  laterality: X", 14, "routing.laterality",
         "laterality is L, R, B or U"),
    ],
    ids=["unknown-key", "unknown-nested-key", "missing-pin", "unknown-model", "destination",
         "bad-regex", "bad-tag", "bad-type", "missing-field", "optional-overlap", "laterality"],
)
def test_problem_names_line_and_field(
    registry: Registry, old: str, new: str, line: int, field: str, message: str
) -> None:
    assert old in GOOD
    problem = _problem(GOOD.replace(old, new, 1), registry)
    assert (problem.line, problem.field) == (line, field), problem
    assert message in problem.message, problem.message


def test_bad_yaml_and_duplicate_keys(registry: Registry) -> None:
    problem = _problem(GOOD.replace("models:\n", "models: [\n", 1), registry)
    assert problem.message.startswith("not valid YAML") and problem.line is not None
    problem = _problem(GOOD + "priority: 3\n", registry)
    assert (problem.line, problem.message) == (
        20, "key 'priority' appears twice (first at line 18)"
    )


def test_conflicting_models_are_refused(registry: Registry) -> None:
    text = GOOD.replace("  - green-seg@1.0.0", "  - green-seg@1.0.0\n  - green-seg-alt")
    problem = _problem(text, registry)
    assert problem.field == "models" and problem.line == 5
    assert "the models do not resolve (for modality OP): green-seg" in problem.message
    assert "conflicts with green-seg-alt" in problem.message


def test_modality_mismatch_is_refused(registry: Registry) -> None:
    text = GOOD.replace("optional_models: [mask-centre]\n", "").replace(
        "  - mask-fraction", "  - mask-fraction\n  - mask-centre"
    ).replace("modality: OP", "modality: [OP, XC]")
    problem = _problem(text, registry)
    assert "for modality XC" in problem.message and "mask-centre" in problem.message


def test_folder_keeps_valid_presets_and_reports_bad_ones(
    tmp_path: Path, registry: Registry
) -> None:
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "a-good.yaml").write_text(GOOD, encoding="utf-8")
    (folder / "b-broken.yaml").write_text("id: [unclosed\n", encoding="utf-8")
    (folder / "c-unknown.yaml").write_text(
        GOOD.replace("id: screening", "id: other").replace("mask-fraction", "ghost"),
        encoding="utf-8",
    )
    (folder / "d-duplicate.yaml").write_text(GOOD, encoding="utf-8")
    (folder / "notes.txt").write_text("ignored", encoding="utf-8")
    result = load_presets(folder, registry=registry, destinations=DESTINATIONS)
    assert sorted(result.presets) == ["screening"]
    assert result.files["screening"].name == "a-good.yaml"
    by_file = {p.file.name: p for p in result.problems if p.file is not None}
    assert sorted(by_file) == ["b-broken.yaml", "c-unknown.yaml", "d-duplicate.yaml"]
    assert by_file["c-unknown.yaml"].line == 6
    assert "already defined in" in by_file["d-duplicate.yaml"].message
    with pytest.raises(PresetError, match=r"no preset 'other' \(loaded: screening\)"):
        result.get("other")


def test_missing_folder_is_empty(tmp_path: Path, registry: Registry) -> None:
    result = load_presets(tmp_path / "none", registry=registry, destinations=set())
    assert result.presets == {} and result.problems == []


def test_nothing_is_evaluated() -> None:
    # A YAML tag that would build a Python object is refused by the safe loader.
    text = textwrap.dedent(GOOD).replace(
        "priority: 10", "priority: !!python/object/apply:os.system ['true']"
    )
    problem = _problem(text, None)
    assert "not valid YAML" in problem.message


def test_data_validation_and_dump_round_trip(registry: Registry) -> None:
    preset = parse_preset(GOOD, Path("p.yaml"), registry=registry, destinations=DESTINATIONS)
    text = dump_preset(preset)
    assert "enabled" not in text  # defaults left out
    again = parse_preset(text, Path("q.yaml"), registry=registry, destinations=DESTINATIONS)
    assert again == preset
    data = preset.model_dump(mode="json")
    assert validate_preset_data(data, registry=registry, destinations=DESTINATIONS) == preset
    data["models"] = ["green-seg", "green-seg-alt"]
    with pytest.raises(PresetError) as info:
        validate_preset_data(data, registry=registry, destinations=DESTINATIONS)
    (problem,) = info.value.problems
    assert isinstance(problem, PresetProblem) and problem.field == "models"
    assert "conflicts with green-seg-alt" in problem.message

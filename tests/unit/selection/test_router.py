"""Router table tests: priority, ties, disabled presets, modality defaults, not routed."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicomnode.routing import Preset, StudyFacts, route


def _preset(pid: str, priority: int = 0, enabled: bool = True, **routing: Any) -> Preset:
    return Preset.model_validate(
        {
            "id": pid,
            "name": pid,
            "audience": "tests",
            "description": "a test preset",
            "models": ["green-seg"],
            "priority": priority,
            "enabled": enabled,
            "routing": routing,
        }
    )


PRESETS = [
    _preset("clinic-cam", 20, modality="OP", calling_ae=["CAM1"]),
    _preset("any-op", 5, modality="OP"),
    _preset("tie-b", 10, station_name="FUNDUS-2"),
    _preset("tie-a", 10, station_name="fundus-2 "),  # case and padding do not matter
    _preset("off", 99, enabled=False, modality="OP"),
    _preset("described", 1, tags=[{"tag": "StudyDescription", "regex": "glaucoma",
                                   "ignore_case": True}]),
    _preset("right-eye", 2, laterality="R", manufacturer="Topcon",
            manufacturer_model=["TRC-NW8"]),
    _preset("manual-only"),
]
DEFAULTS = {"OP": "any-op", "XC": "manual-only", "SC": "missing", "OT": "off"}


def _facts(calling: str | None = None, **tags: str) -> StudyFacts:
    return StudyFacts.from_headers([tags], calling_ae=calling, called_ae="NODE")


@pytest.mark.parametrize(
    ("facts", "preset", "via", "reason_part"),
    [
        (_facts("CAM1", Modality="OP"), "clinic-cam", "preset", "priority 20"),
        (_facts("CAM1", Modality="OP"), "clinic-cam", "preset",
         "also matched at lower priority: any-op"),
        (_facts("CAM9", Modality="OP"), "any-op", "preset", "all 1 conditions held"),
        (_facts(Modality="XC", StationName="FUNDUS-2"), "tie-a", "preset",
         "tie at priority 10 with tie-b: 'tie-a' chosen as first by id"),
        (_facts(Modality="XC", StudyDescription="Glaucoma follow-up"), "described", "preset",
         "preset 'described'"),
        (_facts(Modality="XC", ImageLaterality="R", Manufacturer="TOPCON",
                ManufacturerModelName="TRC-NW8"), "right-eye", "preset", "3 conditions held"),
        (_facts(Modality="XC"), "manual-only", "modality_default", "modality default for XC"),
        (_facts(Modality="SC"), None, "none", "'missing', is not a loaded preset"),
        (_facts(Modality="OT"), None, "none", "'off', is disabled"),
        (_facts(Modality="US"), None, "none",
         "no modality default for US (defaults exist for: OP, OT, SC, XC)"),
        (StudyFacts(()), None, "none", "no modality default for no modality"),
    ],
    ids=["priority", "lower-listed", "second", "tie", "tag-regex", "several-fields",
         "default", "default-missing", "default-disabled", "no-default", "empty"],
)
def test_routing_table(facts: StudyFacts, preset: str | None, via: str, reason_part: str) -> None:
    decision = route(facts, PRESETS, DEFAULTS)
    assert (decision.preset, decision.via) == (preset, via), decision.reason
    assert reason_part in decision.reason
    if preset is None:
        assert decision.reason.startswith("not routed (stored, not processed)")


def test_disabled_preset_is_explained_not_chosen() -> None:
    decision = route(_facts("CAM9", Modality="OP"), PRESETS, {})
    off = next(e for e in decision.explanations if e.preset == "off")
    assert not off.matched and off.note == "conditions held, but the preset is disabled"
    assert [e.preset for e in decision.explanations][:3] == ["off", "clinic-cam", "tie-a"]


def test_explanation_shows_each_condition_and_value_seen() -> None:
    decision = route(_facts("CAM9", Modality="OP"), PRESETS, {})
    clinic = next(e for e in decision.explanations if e.preset == "clinic-cam")
    assert [(c.condition, c.held, c.seen) for c in clinic.conditions] == [
        ("modality", True, ("OP",)),
        ("calling_ae", False, ("CAM9",)),
    ]
    assert clinic.note == "failed: calling_ae"
    assert clinic.conditions[1].text == "calling_ae: expected CAM1; saw CAM9 -> failed"
    manual = next(e for e in decision.explanations if e.preset == "manual-only")
    assert manual.note == "no routing conditions: chosen only as a modality default"
    tag = next(e for e in decision.explanations if e.preset == "described").conditions[0]
    assert tag.condition == "tag StudyDescription (0008,1030)" and tag.seen == ()
    assert "nothing (absent)" in tag.text


def test_any_instance_can_satisfy_a_condition() -> None:
    facts = StudyFacts.from_headers(
        [{"Modality": "XC", "ImageLaterality": "L"}, {"Modality": "XC", "Laterality": "R",
                                                      "Manufacturer": "Topcon",
                                                      "ManufacturerModelName": "TRC-NW8"}]
    )
    assert route(facts, PRESETS, {}).preset == "right-eye"


def test_facts_from_datasets_keep_header_values_and_skip_pixels() -> None:
    ds = Dataset()
    ds.Modality = "OP"
    ds.StudyDescription = "Screening"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelData = b"\0" * 4
    facts = StudyFacts.from_datasets([ds], calling_ae="CAM1 ", called_ae=["NODE"])
    assert facts.values("Modality") == ["OP"]
    assert facts.values("0008,0008") == ["ORIGINAL\\PRIMARY"]
    assert "7FE00010" not in facts.instances[0]
    assert facts.calling_ae_titles == ("CAM1",)
    assert StudyFacts.from_dict(facts.to_dict()) == facts
    assert route(facts, PRESETS, {}).preset == "clinic-cam"

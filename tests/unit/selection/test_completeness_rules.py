"""A preset's `completeness` over the node's: what overrides, what is kept, and when the
study's headers need reading at all (dicomnode.jobs.completeness_rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomnode.db.engine import Database
from dicomnode.jobs.completeness_rules import PresetCompletenessRules, preset_rules
from dicomnode.routing import Preset
from dicomnode.routing.catalog import Catalog
from dicomnode.routing.loader import PresetSet
from dicomnode.settings import CompletenessSettings, Settings

NODE = CompletenessSettings(quiet_seconds=30, expected_laterality=["L", "R"], sweep_seconds=7)


def _preset(pid: str, **completeness: Any) -> Preset:
    return Preset.model_validate({
        "id": pid, "name": pid, "audience": "tests", "description": "a test preset",
        "models": ["green-seg"], "routing": {"modality": "OP"}, "completeness": completeness})


def test_set_values_override_and_unset_ones_keep_the_nodes() -> None:
    assert preset_rules(NODE, _preset("plain")) == NODE
    quick = preset_rules(NODE, _preset("quick", quiet_seconds=2))
    assert (quick.quiet_seconds, quick.expected_laterality, quick.sweep_seconds) == (
        2, ["L", "R"], 7)
    one_eye = preset_rules(NODE, _preset("one-eye", expected_laterality=[]))
    assert (one_eye.quiet_seconds, one_eye.expected_laterality) == (30, [])


class _NoDatabase(Database):
    def __init__(self) -> None:  # any use of it fails the test
        pass

    def transaction(self) -> Any:
        raise AssertionError("the study's headers were read")


def _rules(tmp_path: Path, *presets: Preset) -> PresetCompletenessRules:
    settings = Settings.model_validate({"storage": {"path": str(tmp_path)},
                                        "completeness": NODE.model_dump()})
    catalog = Catalog(registry=None, presets=PresetSet({p.id: p for p in presets}))  # type: ignore[arg-type]
    return PresetCompletenessRules(settings, _NoDatabase(), lambda: catalog)


def test_no_preset_of_its_own_means_the_nodes_rules_without_reading_the_study(
    tmp_path: Path,
) -> None:
    rules = _rules(tmp_path, _preset("plain"), _preset("same", quiet_seconds=30))
    assert rules.for_study("1.2.3") == NODE
    assert rules.shortest_quiet_seconds() == 30


def test_the_shortest_quiet_period_of_any_preset_times_the_first_look(tmp_path: Path) -> None:
    rules = _rules(tmp_path, _preset("plain"), _preset("quick", quiet_seconds=2),
                   _preset("slow", quiet_seconds=900))
    assert rules.shortest_quiet_seconds() == 2

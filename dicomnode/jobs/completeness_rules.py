"""The completeness rules of a study: the node's `completeness` settings, with what the preset
the study routes to sets under its own `completeness` (expected lateralities, quiet period)
taking their place. The assembler asks for them (dicomnode.assemble.assembler.CompletenessRules).

The preset is found the way planning finds it (the same `route` over the headers stored so
far), so a study waits for what the preset that will analyse it expects. Headers are read only
when some preset's rule differs from the node's.
"""

from __future__ import annotations

from collections.abc import Callable

from dicomnode.db.engine import Database
from dicomnode.errors import StudyNotFoundError
from dicomnode.jobs.planning import study_facts
from dicomnode.routing.catalog import Catalog
from dicomnode.routing.preset import Preset
from dicomnode.routing.router import route
from dicomnode.settings import CompletenessSettings, Settings


def preset_rules(node: CompletenessSettings, preset: Preset) -> CompletenessSettings:
    """The node's settings with the preset's overrides (its unset values keep the node's)."""
    overrides = preset.completeness.model_dump(exclude_none=True)
    return node.model_copy(update=overrides) if overrides else node


class PresetCompletenessRules:
    def __init__(self, settings: Settings, database: Database,
                 catalog: Callable[[], Catalog]) -> None:
        self.settings = settings
        self.database = database
        self.catalog = catalog  # the current one: presets are reloaded while the node runs

    def for_study(self, study_uid: str) -> CompletenessSettings:
        node = self.settings.completeness
        presets = self.catalog().presets
        if all(preset_rules(node, p) == node for p in presets.presets.values()):
            return node
        try:
            facts = study_facts(self.database, self.settings.storage.path, study_uid)
        except StudyNotFoundError:
            return node
        decision = route(facts, presets.ordered(), self.settings.modality_defaults)
        preset = None if decision.preset is None else presets.presets.get(decision.preset)
        return node if preset is None else preset_rules(node, preset)

    def shortest_quiet_seconds(self) -> float:
        node = self.settings.completeness
        return min([node.quiet_seconds,
                    *(preset_rules(node, p).quiet_seconds
                      for p in self.catalog().presets.presets.values())])

"""Load the registry and the presets the settings point at, in one call (CLI, node, web)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dicomnode.registry.loader import load_registry
from dicomnode.registry.registry import Registry
from dicomnode.routing.loader import PresetProblem, PresetSet, load_presets
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Catalog:
    registry: Registry
    presets: PresetSet


def load_catalog(settings: Settings) -> Catalog:
    """Never raises for bad models or presets: they are left out and listed in `problems`."""
    registry = load_registry(settings.registry.path)
    presets = load_presets(
        settings.presets.path, registry=registry, destinations=set(settings.destinations)
    )
    presets.problems.extend(check_modality_defaults(settings, presets))
    return Catalog(registry, presets)


def check_modality_defaults(settings: Settings, presets: PresetSet) -> list[PresetProblem]:
    """A modality default must name a loaded, enabled preset, or studies silently go unrouted."""
    problems = []
    for modality, preset_id in sorted(settings.modality_defaults.items()):
        preset = presets.presets.get(preset_id)
        if preset is None:
            message = f"names preset '{preset_id}', which is not loaded"
        elif not preset.enabled:
            message = f"names preset '{preset_id}', which is disabled"
        else:
            continue
        problem = PresetProblem(settings.source, None, f"modality_defaults.{modality}", message)
        logger.warning("settings: %s", problem)
        problems.append(problem)
    return problems

"""Preset schema, loader and router (declarative conditions, never evaluated as code)."""

from dicomnode.routing.catalog import Catalog, load_catalog
from dicomnode.routing.facts import StudyFacts
from dicomnode.routing.loader import (
    PresetProblem,
    PresetSet,
    dump_preset,
    load_preset_file,
    load_presets,
    parse_preset,
    validate_preset_data,
)
from dicomnode.routing.preset import Preset
from dicomnode.routing.router import RoutingDecision, route

__all__ = [
    "Catalog",
    "Preset",
    "PresetProblem",
    "PresetSet",
    "RoutingDecision",
    "StudyFacts",
    "dump_preset",
    "load_catalog",
    "load_preset_file",
    "load_presets",
    "parse_preset",
    "route",
    "validate_preset_data",
]

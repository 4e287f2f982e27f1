"""Load the registry and the presets the settings point at, in one call (CLI, node, web), and
hold the node's current catalog (`CatalogHolder`), reloadable by the console and the watcher.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from dicomnode.errors import ResolutionError
from dicomnode.graph.resolver import resolve
from dicomnode.graph.selection import Selection
from dicomnode.registry.loader import load_registry
from dicomnode.registry.registry import Registry
from dicomnode.routing.fingerprint import CatalogPrint, catalog_print
from dicomnode.routing.loader import PresetProblem, PresetSet, load_presets
from dicomnode.routing.preset import Preset
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
    presets.problems.extend(check_modality_defaults(settings, presets, registry))
    return Catalog(registry, presets)


def check_modality_defaults(settings: Settings, presets: PresetSet,
                            registry: Registry | None = None) -> list[PresetProblem]:
    """A modality default must name a loaded, enabled preset whose models take that modality;
    otherwise its studies silently go unrouted, or fail at planning."""
    problems = []
    for modality, preset_id in sorted(settings.modality_defaults.items()):
        preset = presets.presets.get(preset_id)
        if preset is None:
            message = f"names preset '{preset_id}', which is not loaded"
        elif not preset.enabled:
            message = f"names preset '{preset_id}', which is disabled"
        elif registry is not None and (why := _cannot_take(preset, modality, registry)):
            message = (f"names preset '{preset_id}', whose models cannot take modality "
                       f"{modality}: {why}")
        else:
            continue
        problem = PresetProblem(settings.source, None, f"modality_defaults.{modality}", message)
        logger.warning("settings: %s", problem)
        problems.append(problem)
    return problems


def _cannot_take(preset: Preset, modality: str, registry: Registry) -> str | None:
    """Why the preset's graph cannot be resolved for `modality` (None: it can)."""
    try:
        resolve(Selection.of(preset.models, modality=modality, preset=preset.id), registry)
    except ResolutionError as exc:
        return str(exc)
    return None


CatalogListener = Callable[[Catalog], None]


class CatalogHolder:
    """The node's current catalog; `reload()` reads the registry and preset folders again.

    One per node (built by the composition root): the console's preset edits and the catalog
    watcher both reload through it, and listeners (processing service, results pipeline) are
    handed each new catalog. The catalog is swapped as a whole, so a reader always sees one
    consistent registry + presets pair.
    """

    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        # Serialises whole reloads: two overlapping loads must not install the older result last.
        self._reload_lock = threading.Lock()
        # Taken before loading, so a change made during the load shows as a difference later.
        self._print: CatalogPrint | None = None
        if catalog is None:
            self._print = catalog_print(settings)
            catalog = load_catalog(settings)
        self._catalog = catalog
        self._listeners: list[CatalogListener] = []

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def catalog(self) -> Catalog:
        with self._lock:
            return self._catalog

    @property
    def loaded_print(self) -> CatalogPrint | None:
        """The folders' fingerprint the current catalog was loaded from (None: not known)."""
        with self._lock:
            return self._print

    def subscribe(self, listener: CatalogListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def reload(self, reason: str = "requested") -> Catalog:
        """Load again and hand the new catalog to the listeners. Never raises for bad files:
        they are left out and listed in the catalog's problems."""
        with self._reload_lock:
            fingerprint = catalog_print(self._settings)
            catalog = load_catalog(self._settings)
            with self._lock:
                previous = self._catalog
                self._catalog = catalog
                self._print = fingerprint
                listeners = list(self._listeners)
            for listener in listeners:
                # A listener's failure must not undo the reload the user asked for; log it loudly.
                try:
                    listener(catalog)
                except Exception:
                    logger.exception("catalog listener failed after reload")
        log_changes(previous, catalog, reason)
        return catalog


def catalog_changes(old: Catalog, new: Catalog) -> tuple[list[str], list[str]]:
    """(changes, new problems) between two catalogs, as lines for the log."""
    changes: list[str] = []
    old_models = {e.key for e in old.registry.entries()}
    new_models = {e.key for e in new.registry.entries()}
    changes += [f"model added {k}" for k in sorted(new_models - old_models)]
    changes += [f"model removed {k}" for k in sorted(old_models - new_models)]
    old_presets, new_presets = old.presets.presets, new.presets.presets
    changes += [f"preset added {p}" for p in sorted(new_presets.keys() - old_presets.keys())]
    changes += [f"preset removed {p}" for p in sorted(old_presets.keys() - new_presets.keys())]
    changes += [f"preset changed {p}" for p in sorted(new_presets.keys() & old_presets.keys())
                if new_presets[p] != old_presets[p]]
    old_problems = {str(lo) for lo in old.registry.left_out} | {
        str(p) for p in old.presets.problems}
    problems = [f"model refused {lo}" for lo in new.registry.left_out
                if str(lo) not in old_problems]
    problems += [f"preset refused {p}" for p in new.presets.problems
                 if str(p) not in old_problems]
    return changes, problems


def log_changes(old: Catalog, new: Catalog, reason: str) -> None:
    changes, problems = catalog_changes(old, new)
    logger.info("catalog reloaded (%s): %s; %d models, %d presets, %d problems", reason,
                "; ".join(changes) if changes else "no model or preset added, removed or changed",
                len(new.registry), len(new.presets.presets),
                len(new.registry.left_out) + len(new.presets.problems))
    for problem in problems:
        logger.warning("catalog reloaded (%s): %s", reason, problem)

"""What the web layer shares with the running node: settings, database, a reloadable catalog.

The catalog (registry + presets) is held behind a lock and swapped as a whole on reload, so a
reader always sees one consistent pair; listeners (e.g. the processing service) are told.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicomnode.db.engine import Database
from dicomnode.routing.catalog import Catalog, load_catalog
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

CatalogListener = Callable[[Catalog], None]


class CatalogHolder:
    """The current catalog; `reload()` reads the registry and preset folders again."""

    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._catalog = catalog if catalog is not None else load_catalog(settings)
        self._listeners: list[CatalogListener] = []

    @property
    def catalog(self) -> Catalog:
        with self._lock:
            return self._catalog

    def subscribe(self, listener: CatalogListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def reload(self) -> Catalog:
        catalog = load_catalog(self._settings)
        with self._lock:
            self._catalog = catalog
            listeners = list(self._listeners)
        for listener in listeners:
            # A listener's failure must not undo the reload the user asked for; log it loudly.
            try:
                listener(catalog)
            except Exception:
                logger.exception("catalog listener failed after reload")
        logger.info("catalog reloaded: %d models, %d presets",
                    len(catalog.registry), len(catalog.presets.presets))
        return catalog


@dataclass
class WebState:
    settings: Settings
    database: Database
    catalog: CatalogHolder
    # Serialises preset file writes so two saves cannot interleave their read-compare-write.
    preset_lock: threading.Lock = field(default_factory=threading.Lock)
    # Extra health facts from the node (e.g. the processing service's providers in use).
    health_probe: Callable[[], dict[str, Any]] | None = None

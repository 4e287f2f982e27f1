"""What the web layer shares with the running node: settings, database, the node's catalog.

The catalog holder (registry + presets, reloadable, with listeners) belongs to the node: the
composition root builds one per node and hands it here, so the console's preset edits and the
catalog watcher reload the same catalog. It is re-exported here for the web layer's imports.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicomnode.db.engine import Database
from dicomnode.receive.accept import ReceiveListener
from dicomnode.routing.catalog import CatalogHolder, CatalogListener
from dicomnode.settings import Settings

__all__ = ["CatalogHolder", "CatalogListener", "WebState"]

logger = logging.getLogger(__name__)


@dataclass
class WebState:
    settings: Settings
    database: Database
    catalog: CatalogHolder
    # Serialises preset file writes so two saves cannot interleave their read-compare-write.
    preset_lock: threading.Lock = field(default_factory=threading.Lock)
    # Extra health facts from the node (e.g. the processing service's providers in use).
    health_probe: Callable[[], dict[str, Any]] | None = None
    # The node's study assembler, told about instances received by STOW-RS (as by C-STORE);
    # None: completion is left to the assembler's sweep (a web layer without a receiver).
    receive_listener: ReceiveListener | None = None

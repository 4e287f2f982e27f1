"""The catalog watcher: reload the node's catalog when the registry or preset files change.

Preset edits made through this node's console reload at once; this covers everything else: other
nodes sharing the preset folder, an administrator editing a YAML file by hand, a model version
copied into the registry. Every `presets.watch_seconds` the watcher takes the folders'
fingerprint (names, sizes, mtimes, hashes of the small files: no parsing) and compares it with
the one the current catalog was loaded from.

A difference is reloaded only once it has held still for one interval: an editor writing in
place, or a copy in progress, is seen half-done and waited out (debounce). The reload goes
through `CatalogHolder.reload`, the same path as the console's, so the processing service, the
results pipeline and the web all get the new catalog; bad files are left out with their
problems listed, the good ones keep working. A missing folder (an unmounted share) is not
taken for "everything deleted": the current catalog stays until the folder is back.
"""

from __future__ import annotations

import logging
import threading

from dicomnode.routing.catalog import CatalogHolder
from dicomnode.routing.fingerprint import CatalogPrint, catalog_print

logger = logging.getLogger(__name__)


class CatalogWatcher:
    """`start()` / `stop()` a daemon thread that calls `check()` every `interval` seconds."""

    def __init__(self, holder: CatalogHolder, interval: float | None = None) -> None:
        self.holder = holder
        self.interval = (holder.settings.presets.watch_seconds if interval is None
                         else interval)
        # A fingerprint seen changed on the previous tick, waiting to hold still.
        self._pending: CatalogPrint | None = None
        self._missing_warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.interval <= 0:
            logger.info("catalog watcher off (presets.watch_seconds: 0): "
                        "file changes need a restart")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="dicomnode-catalog-watch",
                                        daemon=True)
        self._thread.start()
        logger.info("catalog watcher: checking %s and %s every %g s",
                    self.holder.settings.registry.path, self.holder.settings.presets.path,
                    self.interval)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the check in progress (a reload in progress finishes)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # e.g. a folder vanishing mid-load: keep the catalog, try again
                logger.exception("catalog check failed; the current catalog stays in use, "
                                 "trying again in %g s", self.interval)

    # -- one tick ----------------------------------------------------------------------------

    def check(self) -> bool:
        """Compare the folders with the loaded catalog; reload a change that held still since
        the previous call. Return True when it reloaded."""
        current = catalog_print(self.holder.settings)
        loaded = self.holder.loaded_print
        if current == loaded:
            self._pending = None
            return False
        if loaded is not None and self._folder_vanished(loaded, current):
            self._pending = None
            return False
        if current != self._pending:
            # First sight, or still changing since the last tick: look again next tick.
            if logger.isEnabledFor(logging.DEBUG) and loaded is not None:
                logger.debug("catalog files changing (%s); reloading once they hold still",
                             _summary(loaded.changes(current)))
            self._pending = current
            return False
        self._pending = None
        if loaded is not None:
            logger.info("catalog files changed: %s", _summary(loaded.changes(current)))
        self.holder.reload("files changed")
        return True

    def _folder_vanished(self, loaded: CatalogPrint, current: CatalogPrint) -> bool:
        gone = [path for path, before, now in (
            (self.holder.settings.registry.path, loaded.registry, current.registry),
            (self.holder.settings.presets.path, loaded.presets, current.presets),
        ) if before.exists and not now.exists]
        if gone:
            if not self._missing_warned:
                logger.warning("catalog folder %s is gone; keeping the loaded catalog until it "
                               "is back", ", ".join(map(str, gone)))
                self._missing_warned = True
            return True
        self._missing_warned = False
        return False


def _summary(changes: list[str], limit: int = 10) -> str:
    # A model copied in is several files; a whole registry copied in should not flood the log.
    shown = ", ".join(changes[:limit]) or "?"
    return shown if len(changes) <= limit else f"{shown} and {len(changes) - limit} more"

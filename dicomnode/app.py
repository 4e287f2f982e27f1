"""Composition root: wires the database, the receiver and the study assembler.

`Node(settings).start()` / `.stop()` for embedding and tests; `serve()` runs in the
foreground until SIGINT or SIGTERM and then shuts down cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading

from dicomnode.assemble.assembler import Assembler, StudyCompleteHook
from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.errors import DicomNodeError
from dicomnode.receive.ae import Receiver
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Node:
    def __init__(self, settings: Settings, hooks: list[StudyCompleteHook] | None = None) -> None:
        self.settings = settings
        self.database: Database | None = None
        self.assembler: Assembler | None = None
        self.receiver: Receiver | None = None
        self._hooks = list(hooks or [])
        self._stopped = threading.Event()

    def start(self) -> tuple[str, int]:
        """Open (and migrate) the database, start timing, start listening."""
        settings = self.settings
        if not settings.callers:
            logger.warning(
                "callers is empty: any calling AE title is accepted; list the cameras "
                "under 'callers' to restrict who may send"
            )
        self.database = open_database(settings.database.url)
        self.assembler = Assembler(self.database, settings.completeness, self._hooks)
        self.assembler.start()
        self.receiver = Receiver(settings, self.database, self.assembler)
        host, port = self.receiver.start()
        logger.info("dicomnode %s listening on %s:%d (storage %s)",
                    settings.node.ae_title, host, port, settings.storage.path)
        return host, port

    def stop(self) -> None:
        """Stop accepting, let stores in progress finish, stop timing, close the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.node.shutdown_grace_seconds
        if self.receiver is not None:
            self.receiver.stop(grace)
        if self.assembler is not None:
            self.assembler.stop(wait=True)
        if self.database is not None:
            self.database.dispose()
        logger.info("dicomnode stopped")


def serve(settings: Settings) -> int:
    """Run in the foreground until SIGINT/SIGTERM; return the exit code."""
    # Block the stop signals before any thread starts, so every thread inherits the mask
    # and only sigwait below sees them (PITFALLS.md: pynetdicom's threads otherwise do).
    # The mask stays in place afterwards: a second signal during shutdown must not kill
    # the process halfway through; the process ends when serve returns.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    # APScheduler logs every job run at INFO; the node logs what matters itself.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    node = Node(settings)
    try:
        try:
            node.start()
        except OSError as exc:
            raise DicomNodeError(
                f"cannot listen on {settings.node.host}:{settings.node.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        received = signal.sigwait(_STOP_SIGNALS)
        logger.info("received %s; shutting down", signal.Signals(received).name)
    finally:
        node.stop()
    return 0

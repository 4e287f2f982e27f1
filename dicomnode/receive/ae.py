"""The pynetdicom Application Entity and its server: start listening, stop gracefully."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE

from dicomnode.db.engine import Database
from dicomnode.receive import admission, streamed, tuning
from dicomnode.receive.handlers import ReceiveHandlers, ReceiveListener
from dicomnode.receive.sockets import PreboundAssociationServer
from dicomnode.receive.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION
from dicomnode.receive.tls import start_tls_server
from dicomnode.settings import Settings

logger = logging.getLogger(__name__)


def build_ae(settings: Settings) -> Any:
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    # pynetdicom's own limit sits above the admission's (receive/admission.py), which decides.
    ae.maximum_associations = (node.max_associations + node.reserved_associations
                               + admission.OVERFLOW + node.max_associations_per_host)
    ae.maximum_pdu_size = node.max_pdu
    ae.network_timeout = node.network_timeout_seconds
    # Also how long an accepted connection waits for its A-ASSOCIATE-RQ (the admission's
    # bound, receive/admission.py), and for A-RELEASE answers.
    ae.acse_timeout = min(node.network_timeout_seconds,
                          node.association_request_timeout_seconds)
    ae.dimse_timeout = node.network_timeout_seconds
    # The handlers check called and calling AE titles themselves, to audit each rejection.
    ae.require_called_aet = False
    ae.require_calling_aet = []
    ae.add_supported_context(VERIFICATION, list(TRANSFER_SYNTAXES[:2]))
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
    return ae


@dataclass(frozen=True)
class Listening:
    """Sockets already bound and listening (receive/sockets.py), for a receiving worker
    process: served instead of binding `node.port` and `node.tls.port`."""

    plain: socket.socket | None
    tls: socket.socket | None


class Receiver:
    """Listens for associations; `stop` stops accepting and lets stores in progress finish."""

    def __init__(
        self, settings: Settings, database: Database, listener: ReceiveListener | None = None,
        listening: Listening | None = None,
    ) -> None:
        self.settings = settings
        self.handlers = ReceiveHandlers(settings, database, listener)
        self._listening = listening
        self._ae: Any = None
        self._server: Any = None  # the plain listener (node.port), if any
        self._tls_server: Any = None  # the TLS listener (node.tls), if any
        self._incoming: Any = None  # where data sets are streamed to (receive/streamed.py)

    @property
    def address(self) -> tuple[str, int]:
        """The plain listener's address, or the TLS one's when the plain port is off."""
        server = self._server if self._server is not None else self._tls_server
        if server is None:
            raise RuntimeError("the receiver is not running")
        host, port = server.server_address[:2]
        return str(host), int(port)

    @property
    def tls_address(self) -> tuple[str, int] | None:
        if self._tls_server is None:
            return None
        host, port = self._tls_server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        self.settings.storage.path.mkdir(parents=True, exist_ok=True)
        self._incoming = streamed.enable(
            self.settings.storage.path, self.settings.storage.max_instance_mb * 1024 * 1024)
        tuning.apply()
        self._ae = build_ae(self.settings)
        self.handlers.admission.start()
        node = self.settings.node
        listening = self._listening
        if node.tls is not None:  # first: a bad certificate stops the start before binding
            self._tls_server = start_tls_server(
                self._ae, node, self.handlers.bindings(), self.handlers.on_tls_refused,
                listening=None if listening is None else listening.tls)
        if node.port is not None:
            if listening is None or listening.plain is None:
                self._server = self._ae.start_server(
                    (node.host, node.port),
                    block=False,
                    evt_handlers=self.handlers.bindings(),
                )
            else:
                self._server = self._serve(listening.plain)
        return self.address

    def is_receiving(self, study_uid: str) -> bool:
        return self.handlers.is_receiving(study_uid)

    def _serve(self, listening: socket.socket) -> Any:
        """`AE.start_server(block=False)` on an inherited listening socket."""
        server = self._ae.make_server(
            (self.settings.node.host, self.settings.node.port),
            evt_handlers=self.handlers.bindings(),
            server_class=PreboundAssociationServer, listening=listening,
        )
        threading.Thread(target=server.serve_forever, name="dicom-acceptor",
                         daemon=True).start()
        self._ae._servers.append(server)  # as start_server does: shutdown() removes it
        return server

    def active_associations(self) -> int:
        """Established associations. A connection that never sent a request (a port probe,
        a load balancer's health check) holds nothing worth waiting for."""
        if self._ae is None:
            return 0
        return sum(1 for assoc in self._ae.active_associations if assoc.is_established)

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting; wait up to `grace_seconds` for associations, then abort the rest.

        Stores already inside the handler always finish (file fsync'd, row committed):
        aborting an association only stops further requests on it.
        """
        if self._server is None and self._tls_server is None:
            return
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()  # stop the accept loop and close the listening socket
        deadline = time.monotonic() + grace_seconds
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = [a for a in self._ae.active_associations if a.is_established]
        if remaining:
            logger.warning("aborting %d association(s) still open after %.0f s",
                           len(remaining), grace_seconds)
        for assoc in remaining:
            assoc.abort()
        # A connection that never sent an association request (a port probe) cannot be
        # aborted (pynetdicom's state machine raises), and its non-daemon thread would hold
        # the process until the ACSE timeout: close its socket instead.
        for assoc in self._ae.active_associations:
            if not assoc.is_established:
                with contextlib.suppress(Exception):
                    assoc.dul.socket.close()
        self.handlers.admission.stop()
        if not self.handlers.in_flight.close_and_wait(timeout=max(5.0, grace_seconds)):
            logger.error("%d store(s) still running at shutdown",
                         self.handlers.in_flight.count)
        self._server = self._tls_server = None
        if self._incoming is not None:
            streamed.disable(self._incoming)
            cut = streamed.discard_unfinished(self._incoming)
            if cut:
                logger.info("%d transfer(s) cut off by the shutdown discarded (never "
                            "acknowledged)", cut)
            self._incoming = None

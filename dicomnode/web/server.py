"""Run the web application with uvicorn on a thread inside the node process."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from dicomnode import tls
from dicomnode.db.engine import Database
from dicomnode.errors import DicomNodeError
from dicomnode.receive.accept import ReceiveListener
from dicomnode.settings import Settings, WebSettings
from dicomnode.web.app import create_app
from dicomnode.web.state import CatalogHolder, WebState

logger = logging.getLogger(__name__)


class WebServer:
    """`start()` binds (a taken port raises, naming it) and serves on a thread."""

    def __init__(self, state: WebState, settings: WebSettings) -> None:
        self._settings = settings
        https: dict[str, Any] = {}
        if settings.tls is not None:
            # Checked here, so a bad pair stops the start naming web.tls.* and the file.
            tls.check_pair(tls.KeyPair(settings.tls.certificate, settings.tls.private_key,
                                       "web.tls"))
            https = {"ssl_certfile": str(settings.tls.certificate),
                     "ssl_keyfile": str(settings.tls.private_key)}
        self.scheme = "https" if https else "http"
        config = uvicorn.Config(
            create_app(state), host=settings.host, port=settings.port, log_level="warning",
            access_log=False, lifespan="off", **https,
            # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: anyone on the
            # machine could then pick their "address" and dodge the per-address login limit.
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=list(settings.trusted_proxies),
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    def start(self, timeout: float = 10.0) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET6 if ":" in self._settings.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._settings.host, self._settings.port))
        except OSError as exc:
            sock.close()
            raise DicomNodeError(
                f"web console cannot listen on {self._settings.host}:{self._settings.port}: "
                f"{exc.strerror or exc} (settings: web.host / web.port, or web.enabled: false)"
            ) from exc
        self._socket = sock
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise DicomNodeError("web console did not start (see the log)")
            time.sleep(0.02)
        logger.info("web console and API on %s://%s:%d/", self.scheme, host, port)
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()


def start_web(
    settings: Settings, database: Database, catalog: CatalogHolder,
    health_probe: Callable[[], dict[str, Any]] | None = None,
    receive_listener: ReceiveListener | None = None,
) -> WebServer | None:
    """Start the console/API if `web.enabled`, on the node's catalog holder (one per node:
    preset edits reload it, and its listeners hand the new catalog to processing)."""
    if not settings.web.enabled:
        logger.info("web console disabled (web.enabled: false)")
        return None
    state = WebState(settings, database, catalog, health_probe=health_probe,
                     receive_listener=receive_listener)
    server = WebServer(state, settings.web)
    try:
        server.start()
    except DicomNodeError:
        server.stop(timeout=2.0)  # a half-started server must not linger
        raise
    return server

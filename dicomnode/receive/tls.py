"""The DICOM TLS listener (`node.tls`): a second association server beside the plain port.

pynetdicom's own TLS server runs the handshake inside its accept loop (`wrap_socket` with the
handshake on connect): one caller that connects and stays silent holds every other caller
until it gives up, and a failed handshake vanishes without a trace. Here the accept loop only
wraps the socket; the handshake runs on the connection's own thread under the association
network timeout, and a refused handshake (no certificate, an untrusted one, no common
protocol) is reported to `on_refused`, which audits it like a rejected association.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicomnode import tls
from dicomnode.receive.sockets import Prebound
from dicomnode.settings import NodeSettings, NodeTlsSettings

logger = logging.getLogger(__name__)

# (peer address, reason) of a refused handshake.
RefusedHandler = Callable[[str, str], None]


def server_context(settings: NodeTlsSettings) -> ssl.SSLContext:
    """The listener's context, checked now (ConfigError naming `node.tls.*` and the file)."""
    pair = tls.KeyPair(settings.certificate, settings.private_key, "node.tls")
    certificate = tls.check_pair(pair)
    context = tls.server_context(
        pair, ca_certificates=settings.ca_certificates,
        require_client_certificate=settings.require_client_certificate,
    )
    if certificate.not_valid_after_utc < datetime.now(UTC):
        logger.warning("node.tls.certificate %s expired on %s: callers will refuse it",
                       settings.certificate, certificate.not_valid_after_utc.date())
    return context


class TlsAssociationServer(ThreadedAssociationServer):
    """Handshakes on the connection's thread; refusals go to `on_refused`."""

    def __init__(self, *args: Any, on_refused: RefusedHandler, handshake_timeout: float,
                 **kwargs: Any) -> None:
        self._on_refused = on_refused
        self._handshake_timeout = handshake_timeout
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None and self.ssl_context is not None
        client, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(client, server_side=True,
                                               do_handshake_on_connect=False)
        return wrapped, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0]) if isinstance(client_address, tuple) else "?"
        try:
            request.settimeout(self._handshake_timeout)
            request.do_handshake()
            request.settimeout(None)
        except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
            # Closed before any handshake: a port probe or a load balancer's health check,
            # not a caller (the plain port does not audit those either).
            logger.debug("connection from %s closed before the TLS handshake", peer)
            self.shutdown_request(request)
            return
        except (ssl.SSLError, OSError) as exc:
            reason = _describe(exc)
            logger.warning("TLS handshake from %s refused: %s", peer, reason)
            try:
                self._on_refused(peer, reason)
            except Exception:
                logger.exception("could not report a refused TLS handshake")
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"}:
            return "no client certificate (node.tls.require_client_certificate is true)"
        return f"TLS handshake failed: {reason}"
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return f"connection lost during the TLS handshake: {exc}"


class PreboundTlsServer(Prebound, TlsAssociationServer):
    """The TLS listener of a receiving worker process (receive/sockets.py)."""


def start_tls_server(
    ae: Any, node: NodeSettings, evt_handlers: list[tuple[Any, Any]],
    on_refused: RefusedHandler, listening: socket.socket | None = None,
) -> Any:
    """Bind `node.tls.port` (or serve `listening`, already bound to it) on a thread; the
    server is the AE's, so stopping the AE (or `server.shutdown()`) stops it like the plain
    one."""
    assert node.tls is not None
    context = server_context(node.tls)
    extra: dict[str, Any] = {} if listening is None else {"listening": listening}
    server = ae.make_server(
        (node.host, node.tls.port), ssl_context=context, evt_handlers=evt_handlers,
        server_class=TlsAssociationServer if listening is None else PreboundTlsServer,
        on_refused=on_refused, handshake_timeout=node.network_timeout_seconds, **extra,
    )
    thread = threading.Thread(target=server.serve_forever, name="dicom-tls-acceptor",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # pynetdicom's shutdown() removes it from there
    return server


def peer_certificate(assoc: Any) -> bytes | None:
    """The DER client certificate of a TLS association (None: plain, or none offered)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    return der or None

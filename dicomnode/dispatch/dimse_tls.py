"""DICOM TLS towards DIMSE destinations (`destinations.<name>.tls`): the client contexts.

A context is built once per destination's settings and reused (certificate files are read at
start, so renewing a certificate needs a restart). `check_destinations` builds them all at
start, so a missing or mismatched file stops the node with a message naming the key.
"""

from __future__ import annotations

import ssl
import threading

from dicomnode import tls
from dicomnode.settings import DestinationSettings, DestinationTlsSettings, Settings

_contexts: dict[DestinationTlsSettings, ssl.SSLContext] = {}
_lock = threading.Lock()


def context_for(settings: DestinationTlsSettings, where: str) -> ssl.SSLContext:
    with _lock:
        context = _contexts.get(settings)
        if context is None:
            pair = None
            if settings.certificate is not None and settings.private_key is not None:
                pair = tls.KeyPair(settings.certificate, settings.private_key, where)
            context = tls.client_context(where, ca_certificates=settings.ca_certificates,
                                         pair=pair, verify_hostname=settings.verify_hostname)
            _contexts[settings] = context
        return context


def tls_args(destination: DestinationSettings) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for an association to `destination` (None: plain TCP)."""
    if destination.tls is None:
        return None
    where = f"destinations.{destination.ae_title}.tls"
    return context_for(destination.tls, where), destination.host


def check_destinations(settings: Settings) -> None:
    """Build every DIMSE destination's TLS context now (ConfigError naming the key)."""
    for name, destination in settings.destinations.items():
        if isinstance(destination, DestinationSettings) and destination.tls is not None:
            context_for(destination.tls, f"destinations.{name}.tls")

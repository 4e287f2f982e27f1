"""Who may associate: the called AE title must be ours, the caller must be on the allow-list.

An empty allow-list admits any caller (the node warns about it at start). An entry with a
host admits that AE title only from that host; host names are resolved once, at start. An
entry with a `certificate_subject` admits that AE title only over TLS, with a (verified)
client certificate whose subject is that name.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from dicomnode import tls
from dicomnode.settings import CallerSettings

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4), source "DICOM UL service-user".
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


@dataclass(frozen=True)
class Rejection:
    diagnostic: int
    reason: str


def _addresses(host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        logger.warning("caller host %r cannot be resolved (%s); that entry admits no one",
                       host, exc)
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


class CallerPolicy:
    def __init__(self, ae_title: str, callers: list[CallerSettings]) -> None:
        self.ae_title = ae_title.strip()
        self._entries = [
            (caller.ae_title, None if caller.host is None else _addresses(caller.host),
             caller.certificate_subject)
            for caller in callers
        ]

    @property
    def admits_anyone(self) -> bool:
        return not self._entries

    def check(
        self, called_ae: str, calling_ae: str, peer_host: str, certificate: bytes | None = None
    ) -> Rejection | None:
        """None when the association may proceed, else why it is rejected.

        `certificate` is the caller's verified TLS client certificate (DER), if any.
        """
        if called_ae.strip() != self.ae_title:
            return Rejection(CALLED_AE_NOT_RECOGNISED, "called AE title is not this node's")
        if self.admits_anyone:
            return None
        calling = calling_ae.strip()
        pinned_miss: str | None = None
        for ae_title, hosts, subject in self._entries:
            if ae_title != calling or (hosts is not None and _normalise(peer_host) not in hosts):
                continue
            if subject is None:
                return None
            if certificate is None:
                pinned_miss = (f"caller's certificate_subject is pinned ({subject}) but it "
                               "offered no TLS client certificate")
            elif tls.subject_matches(subject, certificate):
                return None
            else:
                pinned_miss = (f"client certificate subject {tls.subject_text(certificate)!r} "
                               f"is not the pinned {subject!r}")
        if pinned_miss is not None:
            return Rejection(CALLING_AE_NOT_RECOGNISED, pinned_miss)
        return Rejection(CALLING_AE_NOT_RECOGNISED, "caller not on the allow-list")


def _normalise(host: str) -> str:
    # An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
    return host[7:] if host.startswith("::ffff:") else host

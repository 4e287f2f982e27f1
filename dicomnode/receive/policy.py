"""Who may associate: the called AE title must be ours, the caller must be on the allow-list.

An empty allow-list admits any caller (the node warns about it at start). An entry with a
host admits that AE title only from that host; host names are resolved once, at start.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

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
            (caller.ae_title, None if caller.host is None else _addresses(caller.host))
            for caller in callers
        ]

    @property
    def admits_anyone(self) -> bool:
        return not self._entries

    def check(self, called_ae: str, calling_ae: str, peer_host: str) -> Rejection | None:
        """None when the association may proceed, else why it is rejected."""
        if called_ae.strip() != self.ae_title:
            return Rejection(CALLED_AE_NOT_RECOGNISED, "called AE title is not this node's")
        if self.admits_anyone:
            return None
        calling = calling_ae.strip()
        for ae_title, hosts in self._entries:
            if ae_title == calling and (hosts is None or _normalise(peer_host) in hosts):
                return None
        return Rejection(CALLING_AE_NOT_RECOGNISED, "caller not on the allow-list")


def _normalise(host: str) -> str:
    # An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
    return host[7:] if host.startswith("::ffff:") else host

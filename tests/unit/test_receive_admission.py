"""Admission of connections before they have said who they are (no network: sockets are
recorded, not real)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from dicomnode.receive.admission import Admission


class _Socket:
    def __init__(self) -> None:
        self.shut = False

    def shutdown(self, _how: int) -> None:
        self.shut = True


class _Association:
    """Hashable, like pynetdicom's (the admission keys its state on it)."""

    def __init__(self) -> None:
        self.dul = SimpleNamespace(socket=SimpleNamespace(socket=_Socket()))


def _assoc() -> Any:
    return _Association()


def _shut(assoc: Any) -> bool:
    return bool(assoc.dul.socket.socket.shut)


def _admission(*, max_associations: int = 2, per_host: int = 10,
               request_timeout: float = 30.0) -> Admission:
    return Admission(max_associations=max_associations, per_host=per_host, reserved=1,
                     request_timeout=request_timeout)


def test_silent_connections_make_room_for_new_ones_oldest_first() -> None:
    admission = _admission()
    first, second, third = _assoc(), _assoc(), _assoc()
    assert admission.opened(first, "10.0.0.9") and admission.opened(second, "10.0.0.9")
    assert admission.opened(third, "10.0.0.5")  # two waiting already: the oldest goes
    assert _shut(first) and not _shut(second) and not _shut(third)


def test_established_associations_are_never_displaced_and_reserved_is_for_listed() -> None:
    admission = _admission()
    held = [_assoc() for _ in range(2)]
    for assoc in held:
        assert admission.opened(assoc, "10.0.0.1")
        assert admission.requested(assoc, allow_listed=False)
    unlisted, listed = _assoc(), _assoc()
    assert admission.opened(unlisted, "10.0.0.2")
    assert not admission.requested(unlisted, allow_listed=False)  # max_associations reached
    admission.closed(unlisted)
    assert admission.opened(listed, "10.0.0.3")
    assert admission.requested(listed, allow_listed=True)  # the reserved slot
    assert not any(_shut(a) for a in held)


def test_one_host_is_capped_by_displacing_its_own_silent_connection() -> None:
    admission = _admission(max_associations=50, per_host=2)
    a, b, c, other = _assoc(), _assoc(), _assoc(), _assoc()
    assert admission.opened(a, "10.0.0.7") and admission.opened(b, "10.0.0.7")
    assert admission.opened(other, "10.0.0.8")
    assert admission.opened(c, "10.0.0.7")
    assert _shut(a) and not _shut(b) and not _shut(other)


def test_a_connection_without_a_request_is_closed_after_the_timeout() -> None:
    admission = _admission(request_timeout=0.2)
    silent, talker = _assoc(), _assoc()
    admission.start()
    try:
        admission.opened(silent, "10.0.0.1")
        admission.opened(talker, "10.0.0.2")
        admission.requested(talker, allow_listed=False)
        deadline = time.monotonic() + 3
        while not _shut(silent) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        admission.stop()
    assert _shut(silent) and not _shut(talker)

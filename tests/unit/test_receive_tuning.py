"""The receive tuning (dicomnode/receive/tuning.py): pynetdicom's socket read, faster, same
contract: `nr_bytes` exactly, or what came before the peer closed."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from dicomnode.receive import tuning


def _send_then_close(sock: socket.socket, data: bytes) -> threading.Thread:
    def send() -> None:
        sock.sendall(data)
        sock.close()

    thread = threading.Thread(target=send)
    thread.start()
    return thread


@pytest.mark.parametrize("size", [6, 131072, 3 * 1024 * 1024 + 17])
def test_reads_exactly_what_is_asked(size: int) -> None:
    ours, theirs = socket.socketpair()
    data = bytes(range(256)) * (size // 256 + 2)
    sender = _send_then_close(theirs, data)
    first = tuning._recv(SimpleNamespace(socket=ours), size)
    rest = tuning._recv(SimpleNamespace(socket=ours), len(data))
    sender.join()
    ours.close()
    assert bytes(first) == data[:size]
    assert bytes(rest) == data[size:]  # the peer closed: what came, not what was asked


def test_grows_past_the_preallocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "_PREALLOCATE", 1000)
    ours, theirs = socket.socketpair()
    data = bytes(range(256)) * 50  # 12 800 bytes: 13 growth steps
    sender = _send_then_close(theirs, data)
    got = tuning._recv(SimpleNamespace(socket=ours), 1 << 30)  # a huge announced length
    sender.join()
    ours.close()
    assert bytes(got) == data


def test_timeout_propagates() -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(0.05)
    with pytest.raises(TimeoutError):
        tuning._recv(SimpleNamespace(socket=ours), 10)
    ours.close()
    theirs.close()

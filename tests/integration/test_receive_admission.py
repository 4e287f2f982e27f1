"""Idle TCP connections cannot lock cameras out (raw sockets as the attacker, DCMTK echoscu
as the camera, a real node process)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE

from tests.support.node import NODE_AE, NodeProcess, write_config
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"


def _silent(port: int, count: int) -> list[socket.socket]:
    """Connections that send two bytes of a PDU header and then nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"\x01\x00")
        sockets.append(sock)
    return sockets


def _echo(port: int, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    exe = require_tool("echoscu", "dcmtk")
    return subprocess.run([exe, "-to", "5", "-ta", "5", "-aet", "CAM1", "-aec", NODE_AE,
                           "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=timeout)


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    config = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'node.db'}",
        node={"max_associations": 4, "max_associations_per_host": 6,
              "reserved_associations": 1, "association_request_timeout_seconds": 1.5,
              "network_timeout_seconds": 60},
        callers=[{"ae_title": "CAM1"}],
    )
    with NodeProcess(config) as process:
        yield process


def test_silent_connections_do_not_lock_the_camera_out(tmp_path: Path) -> None:
    """Defaults apart from the limit itself: eight silent connections, then the camera."""
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'node.db'}",
                          node={"max_associations": 8, "network_timeout_seconds": 60})
    with NodeProcess(config) as node:
        _camera_gets_through(node)


def _camera_gets_through(node: NodeProcess) -> None:
    held = _silent(node.port, 12)
    try:
        started = time.monotonic()
        result = _echo(node.port)
        assert result.returncode == 0, result.stdout + result.stderr
        # At once: by displacing a silent connection, not by waiting for a timeout.
        assert time.monotonic() - started < 1.2
    finally:
        for sock in held:
            sock.close()


def test_a_silent_connection_is_closed_after_the_request_timeout(node: NodeProcess) -> None:
    [sock] = _silent(node.port, 1)
    try:
        started = time.monotonic()
        assert _closed_by_peer(sock, within=6), "the node kept a silent connection open"
        assert 1.0 < time.monotonic() - started < 5
    finally:
        sock.close()


def test_established_associations_are_limited_and_never_displaced(node: NodeProcess) -> None:
    ae = AE(ae_title="CAM1")
    ae.add_requested_context(VERIFICATION)
    held = []
    try:
        # max_associations 4 + 1 reserved for listed callers: five open at once.
        for _ in range(5):
            assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
            assert assoc.is_established
            held.append(assoc)
        extra = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        # Rejected (A-ASSOCIATE-RJ then close; pynetdicom may see the close first).
        assert not extra.is_established
        assert "local limit of 4 associations reached" in node.log()
        # Silent connections arriving now do not take the established ones' places.
        silent = _silent(node.port, 3)
        for assoc in held:
            assert assoc.send_c_echo().Status == 0x0000
        for sock in silent:
            sock.close()
    finally:
        for assoc in held:
            assoc.release()
    assert _echo(node.port).returncode == 0


def test_connections_the_node_closed_do_not_fill_its_association_limit(
    node: NodeProcess
) -> None:
    """Forty silent connections, each beyond the per-host limit displacing the oldest: the
    closed ones must stop counting at once (pynetdicom's own limit here is 19), or the
    camera is rejected with "local limit exceeded"."""
    churn: list[socket.socket] = []
    try:
        for _ in range(40):
            churn += _silent(node.port, 1)
        time.sleep(0.5)
        result = _echo(node.port)
    finally:
        for sock in churn:
            sock.close()
    assert result.returncode == 0, result.stdout + result.stderr

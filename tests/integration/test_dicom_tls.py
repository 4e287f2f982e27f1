"""DICOM TLS against DCMTK over loopback, with certificates made in the test.

The node listens on a plain port and a TLS port (mutual TLS, client certificates checked
against the test CA, CAM1 pinned to its certificate subject). DCMTK `echoscu`/`storescu +tls`
play the camera; DCMTK `storescp +tls` plays a PACS that requires our client certificate.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Instance
from dicomnode.dispatch.sender import echo, send_batch
from dicomnode.errors import ConfigError
from dicomnode.receive.ae import Receiver
from dicomnode.settings import (
    DestinationSettings,
    DestinationTlsSettings,
    DispatchSettings,
    load_settings,
)
from tests.support.certs import Authority, Issued, make_authority
from tests.support.dicom_files import write_op
from tests.support.node import NODE_AE, NodeProcess, write_config
from tests.support.peers import free_port, require_tool

pytestmark = pytest.mark.integration

PINNED = "CN=CAM1,O=Test Clinic"


@dataclass
class Certs:
    ca: Authority
    node: Issued
    cam1: Issued  # CN=CAM1, signed by the CA: matches the pin
    other: Issued  # CN=CAM9, signed by the CA: trusted, but not CAM1's subject
    rogue: Issued  # CN=CAM1 signed by another CA: not trusted
    pacs: Issued


@dataclass
class Env:
    node: NodeProcess
    tls_port: int
    database: Database
    certs: Certs
    work: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    ca = make_authority(folder)
    rogue_ca = make_authority(folder, "rogue-ca", "Rogue CA")
    return Certs(
        ca=ca,
        node=ca.issue(folder, "node", common_name="dicomnode"),
        cam1=ca.issue(folder, "cam1", common_name="CAM1", hosts=False),
        other=ca.issue(folder, "cam9", common_name="CAM9", hosts=False),
        rogue=rogue_ca.issue(folder, "rogue", common_name="CAM1", hosts=False),
        pacs=ca.issue(folder, "pacs", common_name="pacs"),
    )


# Also with two receiving processes (receive/workers.py): both listeners are served by the
# workers, from sockets the main process bound.
@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-processes"])
def env(certs: Certs, tmp_path_factory: pytest.TempPathFactory,
        request: pytest.FixtureRequest) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("tls-node")
    url = f"sqlite:///{work / 'node.db'}"
    tls_port = free_port()
    config = write_config(
        work, url,
        node={"tls": {"port": tls_port, "certificate": str(certs.node.certificate),
                      "private_key": str(certs.node.private_key),
                      "ca_certificates": str(certs.ca.certificate),
                      "require_client_certificate": True}},
        callers=[{"ae_title": "CAM1", "certificate_subject": PINNED}, {"ae_title": "CAM2"}],
        completeness={"quiet_seconds": 600},
        receive={"processes": request.param},
    )
    with NodeProcess(config) as node:
        database = Database(url)
        try:
            yield Env(node, tls_port, database, certs, work)
        finally:
            database.dispose()


def dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool(tool, "dcmtk")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def tls_client(env: Env, issued: Issued | None) -> list[str]:
    """DCMTK client options: our certificate (or anonymous TLS), trusting the test CA."""
    ca = ["+cf", str(env.certs.ca.certificate)]
    if issued is None:
        return ["+tla", *ca]
    return ["+tls", str(issued.private_key), str(issued.certificate), *ca]


def stored(env: Env, sop_instance_uid: str) -> bool:
    with env.database.transaction() as session:
        return session.scalar(select(Instance.id).where(
            Instance.sop_instance_uid == sop_instance_uid)) is not None


def rejections_since(env: Env, since: int) -> list[tuple[str | None, str | None]]:
    with env.database.transaction() as session:
        rows = session.execute(
            select(AuditEvent.calling_ae, AuditEvent.detail)
            .where(AuditEvent.kind == "association-rejected", AuditEvent.id > since)
        ).all()
    return [(calling, detail) for calling, detail in rows]


def last_audit_id(env: Env) -> int:
    with env.database.transaction() as session:
        return session.scalar(select(AuditEvent.id).order_by(AuditEvent.id.desc())) or 0


def wait_for_rejection(env: Env, since: int) -> list[tuple[str | None, str | None]]:
    """The refusal is audited on the node's connection thread, just after the client saw it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = rejections_since(env, since)
        if rows:
            return rows
        time.sleep(0.05)
    return []


def test_echo_and_store_with_a_trusted_certificate(env: Env, tmp_path: Path) -> None:
    port = str(env.tls_port)
    result = dcmtk("echoscu", *tls_client(env, env.certs.cam1), "-aet", "CAM1", "-aec", NODE_AE,
                   "127.0.0.1", port)
    assert result.returncode == 0, result.stderr
    path = write_op(tmp_path / "r.dcm")
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    result = dcmtk("storescu", *tls_client(env, env.certs.cam1), "-aet", "CAM1",
                   "-aec", NODE_AE, "127.0.0.1", port, str(path))
    assert result.returncode == 0, result.stderr
    assert stored(env, uid)


@pytest.mark.parametrize("who", ["rogue", "anonymous"])
def test_untrusted_or_missing_certificate_is_refused_and_audited(
    env: Env, tmp_path: Path, who: str
) -> None:
    issued = env.certs.rogue if who == "rogue" else None
    path = write_op(tmp_path / "r.dcm")
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    since = last_audit_id(env)
    # A port probe (connect, close) is no caller: not audited, so only one row below.
    with socket.create_connection(("127.0.0.1", env.tls_port), timeout=5):
        pass
    result = dcmtk("storescu", *tls_client(env, issued), "-aet", "CAM1", "-aec", NODE_AE,
                   "127.0.0.1", str(env.tls_port), str(path))
    assert result.returncode != 0
    assert not stored(env, uid)
    rows = wait_for_rejection(env, since)
    assert len(rows) == 1, rows
    expected = "client certificate not trusted" if who == "rogue" else "no client certificate"
    assert rows[0][1] is not None and rows[0][1].startswith("TLS: " + expected), rows


def test_pinned_subject_must_match(env: Env, tmp_path: Path) -> None:
    """CAM9's certificate is trusted, but CAM1 is pinned to CAM1's subject."""
    since = last_audit_id(env)
    result = dcmtk("echoscu", *tls_client(env, env.certs.other), "-aet", "CAM1",
                   "-aec", NODE_AE, "127.0.0.1", str(env.tls_port))
    assert result.returncode != 0
    rows = wait_for_rejection(env, since)
    assert rows and rows[0][0] == "CAM1", rows
    assert "is not the pinned 'CN=CAM1,O=Test Clinic'" in str(rows[0][1])
    # The same trusted certificate serves an unpinned caller.
    result = dcmtk("echoscu", *tls_client(env, env.certs.other), "-aet", "CAM2",
                   "-aec", NODE_AE, "127.0.0.1", str(env.tls_port))
    assert result.returncode == 0, result.stderr


def test_plain_port_works_beside_tls_but_not_for_a_pinned_caller(
    env: Env, tmp_path: Path
) -> None:
    path = write_op(tmp_path / "plain.dcm")
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    result = dcmtk("storescu", "-aet", "CAM2", "-aec", NODE_AE, "127.0.0.1",
                   str(env.node.port), str(path))
    assert result.returncode == 0, result.stderr
    assert stored(env, uid)
    since = last_audit_id(env)
    result = dcmtk("echoscu", "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1", str(env.node.port))
    assert result.returncode != 0
    rows = wait_for_rejection(env, since)
    assert rows and "offered no TLS client certificate" in str(rows[0][1]), rows


def test_bad_key_stops_the_start_naming_file_and_key(certs: Certs, tmp_path: Path) -> None:
    """The receiver checks the pair before it binds (the CLI prints this and exits 2)."""
    config = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'node.db'}",
        node={"tls": {"port": free_port(), "certificate": str(certs.node.certificate),
                      "private_key": str(certs.pacs.private_key),
                      "ca_certificates": str(certs.ca.certificate)}},
    )
    settings = load_settings(config)
    database = open_database(settings.database.url)
    receiver = Receiver(settings, database)
    try:
        with pytest.raises(ConfigError) as caught:
            receiver.start()
    finally:
        receiver.stop(0)
        database.dispose()
    assert (f"node.tls.private_key: {certs.pacs.private_key} does not match the certificate "
            f"{certs.node.certificate}") in str(caught.value)
    with socket.socket() as probe:  # the plain port was not bound either
        assert probe.connect_ex(("127.0.0.1", settings.node.port or 0)) != 0


@pytest.fixture
def tls_pacs(certs: Certs, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp with TLS, requiring a client certificate signed by the test CA."""
    exe = require_tool("storescp", "dcmtk")
    port = free_port()
    out = tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen(
        [exe, "+tls", str(certs.pacs.private_key), str(certs.pacs.certificate),
         "+cf", str(certs.ca.certificate), "-aet", "PACS", "-od", str(out), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _dispatch() -> DispatchSettings:
    return DispatchSettings(connect_timeout_seconds=5, network_timeout_seconds=10)


def test_results_are_delivered_to_a_tls_destination(
    certs: Certs, tls_pacs: tuple[int, Path], tmp_path: Path
) -> None:
    port, out = tls_pacs
    trusted = DestinationSettings(
        ae_title="PACS", host="127.0.0.1", port=port,
        tls=DestinationTlsSettings(ca_certificates=certs.ca.certificate,
                                   certificate=certs.cam1.certificate,
                                   private_key=certs.cam1.private_key))
    outcome = echo("pacs", trusted, calling_ae=NODE_AE, settings=_dispatch())
    assert outcome.ok, outcome.detail
    files = [write_op(tmp_path / f"{lat}.dcm", laterality=lat) for lat in "RL"]
    results = send_batch(trusted, list(enumerate(files)), calling_ae=NODE_AE,
                         settings=_dispatch())
    assert [r.ok for r in results] == [True, True], results
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in out.iterdir()}
    assert received == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                        for p in files}
    # Without our client certificate, the PACS refuses the handshake: a visible failure.
    anonymous = DestinationSettings(
        ae_title="PACS", host="127.0.0.1", port=port,
        tls=DestinationTlsSettings(ca_certificates=certs.ca.certificate))
    outcome = echo("pacs", anonymous, calling_ae=NODE_AE, settings=_dispatch())
    assert not outcome.ok and "(TLS)" in outcome.detail
    # A PACS whose certificate our CA file does not vouch for is refused by us.
    wrong_ca = DestinationSettings(
        ae_title="PACS", host="127.0.0.1", port=port,
        tls=DestinationTlsSettings(ca_certificates=certs.rogue.certificate,
                                   certificate=certs.cam1.certificate,
                                   private_key=certs.cam1.private_key))
    assert not echo("pacs", wrong_ca, calling_ae=NODE_AE, settings=_dispatch()).ok

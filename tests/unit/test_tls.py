"""TLS contexts from settings files: start-up errors name the key and the file."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from dicomnode import tls
from dicomnode.errors import ConfigError
from dicomnode.receive.policy import CallerPolicy
from dicomnode.settings import CallerSettings, load_settings
from tests.support.certs import make_authority


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs")


def test_a_good_pair_makes_a_mutual_tls_server_context(folder: Path) -> None:
    ca = make_authority(folder)
    node = ca.issue(folder, "node", common_name="node")
    context = tls.server_context(tls.KeyPair(node.certificate, node.private_key, "node.tls"),
                                 ca_certificates=ca.certificate,
                                 require_client_certificate=True)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_errors_name_the_key_and_the_file(folder: Path) -> None:
    ca = make_authority(folder, "ca2")
    one = ca.issue(folder, "one", common_name="one")
    two = ca.issue(folder, "two", common_name="two")
    missing = folder / "missing.key"
    with pytest.raises(ConfigError, match=re.escape(
            f"node.tls.private_key: file {missing} does not exist")):
        tls.check_pair(tls.KeyPair(one.certificate, missing, "node.tls"))
    with pytest.raises(ConfigError, match=re.escape(
            f"web.tls.certificate: {one.private_key} is not a PEM certificate")):
        tls.check_pair(tls.KeyPair(one.private_key, one.private_key, "web.tls"))
    with pytest.raises(ConfigError, match=re.escape(
            f"destinations.pacs.tls.private_key: {two.private_key} "
            f"does not match the certificate {one.certificate}")):
        tls.check_pair(tls.KeyPair(one.certificate, two.private_key, "destinations.pacs.tls"))
    with pytest.raises(ConfigError, match=r"node\.tls\.ca_certificates is not set"):
        tls.server_context(tls.KeyPair(one.certificate, one.private_key, "node.tls"),
                           ca_certificates=None, require_client_certificate=True)
    with pytest.raises(ConfigError, match=r"node\.tls\.ca_certificates: .* holds no usable PEM"):
        tls.server_context(tls.KeyPair(one.certificate, one.private_key, "node.tls"),
                           ca_certificates=one.private_key, require_client_certificate=True)


def test_pinned_subject_matches_in_any_order_and_only_exactly(folder: Path) -> None:
    ca = make_authority(folder, "ca3")
    cam = ca.issue(folder, "cam", common_name="CAM1", organisation="Eye Clinic")
    der = x509.load_pem_x509_certificate(cam.certificate.read_bytes()).public_bytes(
        Encoding.DER)
    assert tls.subject_matches("CN=CAM1,O=Eye Clinic", der)
    assert tls.subject_matches("O=Eye Clinic,CN=CAM1", der)
    assert not tls.subject_matches("CN=CAM1", der)
    assert not tls.subject_matches("CN=CAM2,O=Eye Clinic", der)
    policy = CallerPolicy("NODE", [CallerSettings(ae_title="CAM1",
                                                  certificate_subject="CN=CAM1,O=Eye Clinic")])
    assert policy.check("NODE", "CAM1", "127.0.0.1", der) is None
    rejection = policy.check("NODE", "CAM1", "127.0.0.1", None)
    assert rejection is not None and "offered no TLS client certificate" in rejection.reason


def test_the_hospital_network_example_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "hospital-network.yaml"
    settings = load_settings(example)
    assert settings.node.port is None and settings.node.tls is not None
    assert settings.node.tls.certificate == example.parent / "tls" / "node.crt"
    assert settings.web.cookies_secure
    assert settings.retention.enabled
    assert {d.type for d in settings.destinations.values()} == {"dimse", "dicomweb"}

"""TLS contexts for DICOM (SCP and SCU) and HTTPS, from certificate files named in settings.

Each context is checked when it is built, so a missing file, a file that is not a certificate
or key, or a key that does not belong to its certificate stops the node at start with a message
that names the settings key and the file (`ConfigError`), not at the first connection.

Certificate subjects are compared as sets of attribute/value pairs (RFC 4514 strings read by
`cryptography`), so `CN=CAM1,O=Eye Clinic` matches the same name however it is ordered.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dicomnode.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyPair:
    """A certificate (chain) file and its private key file, with the settings keys naming them
    (for error messages, e.g. `node.tls.certificate`)."""

    certificate: Path
    private_key: Path
    where: str  # the settings section, e.g. "node.tls" or "destinations.pacs.tls"


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc


def check_pair(pair: KeyPair) -> x509.Certificate:
    """The first certificate of the chain file, after checking that the key belongs to it."""
    cert_key, key_key = f"{pair.where}.certificate", f"{pair.where}.private_key"
    cert_pem = _read(pair.certificate, cert_key)
    key_pem = _read(pair.private_key, key_key)
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{cert_key}: {pair.certificate} is not a PEM certificate") from exc
    try:
        key = load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise ConfigError(f"{key_key}: {pair.private_key} is encrypted; dicomnode needs an "
                          "unencrypted key file (protect it with file permissions)") from exc
    except ValueError as exc:
        raise ConfigError(f"{key_key}: {pair.private_key} is not a PEM private key") from exc
    if key.public_key() != certificate.public_key():
        raise ConfigError(f"{key_key}: {pair.private_key} does not match the certificate "
                          f"{pair.certificate} ({cert_key})")
    return certificate


def _load_ca(context: ssl.SSLContext, ca_certificates: Path, key: str) -> None:
    _read(ca_certificates, key)
    try:
        context.load_verify_locations(cafile=str(ca_certificates))
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}: {ca_certificates} holds no usable PEM certificate "
                          f"({exc.reason or exc})") from exc


def _load_pair(context: ssl.SSLContext, pair: KeyPair) -> None:
    check_pair(pair)
    try:
        context.load_cert_chain(str(pair.certificate), str(pair.private_key))
    except ssl.SSLError as exc:  # checked above; a chain OpenSSL still refuses
        raise ConfigError(f"{pair.where}.certificate: {pair.certificate} cannot be used "
                          f"with {pair.private_key}: {exc.reason or exc}") from exc


def server_context(
    pair: KeyPair, *, ca_certificates: Path | None, require_client_certificate: bool
) -> ssl.SSLContext:
    """A server context (TLS 1.2 or newer, as BCP 195 asks). With `ca_certificates` a client
    certificate is verified against them: required, or only checked when one is offered."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, pair)
    if ca_certificates is not None:
        _load_ca(context, ca_certificates, f"{pair.where}.ca_certificates")
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate \
            else ssl.CERT_OPTIONAL
    elif require_client_certificate:
        raise ConfigError(f"{pair.where}.require_client_certificate is true but "
                          f"{pair.where}.ca_certificates is not set: name the CA file that "
                          "client certificates are checked against")
    return context


def client_context(
    where: str, *, ca_certificates: Path | None, pair: KeyPair | None, verify_hostname: bool
) -> ssl.SSLContext:
    """A client context that verifies the server against `ca_certificates` (the system's
    trusted CAs when None) and presents `pair` when the server asks for a certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_certificates is not None:
        _load_ca(context, ca_certificates, f"{where}.ca_certificates")
    else:
        context.load_default_certs()
    if pair is not None:
        _load_pair(context, pair)
    return context


def _attributes(name: x509.Name) -> frozenset[tuple[str, str]]:
    return frozenset((attr.oid.dotted_string, str(attr.value)) for attr in name)


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 distinguished name (`CN=CAM1,O=Eye Clinic`); ValueError if malformed."""
    name = x509.Name.from_rfc4514_string(text)
    if not list(name):
        raise ValueError("an empty distinguished name")
    return name


def subject_matches(pinned: str, der_certificate: bytes) -> bool:
    """Whether the certificate's subject is exactly the pinned distinguished name."""
    certificate = x509.load_der_x509_certificate(der_certificate)
    return _attributes(certificate.subject) == _attributes(parse_subject(pinned))


def subject_text(der_certificate: bytes) -> str:
    return x509.load_der_x509_certificate(der_certificate).subject.rfc4514_string()

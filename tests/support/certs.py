"""Test certificates made in code with `cryptography`: a CA, and leaf certificates it signs.

RSA 2048 keys with SHA-256 signatures: what DCMTK's default BCP 195 profile accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate file, and what it needs to sign more."""

    certificate: Path
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    def issue(self, folder: Path, name: str, *, common_name: str,
              organisation: str = "Test Clinic", hosts: bool = True,
              expired: bool = False) -> Issued:
        """A leaf certificate for server and client use; with `hosts`, valid for 127.0.0.1
        and localhost."""
        key = _key()
        now = datetime.now(UTC)
        start, end = ((now - timedelta(days=10), now - timedelta(days=1)) if expired
                      else (now - timedelta(minutes=5), now + timedelta(days=30)))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organisation))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(_write_cert(folder / f"{name}.crt", cert),
                      _write_key(folder / f"{name}.key", key))


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_authority(folder: Path, name: str = "ca", common_name: str = "Test CA") -> Authority:
    key = _key()
    now = datetime.now(UTC)
    subject = _name(common_name, "Test Hospital IT")
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(_write_cert(folder / f"{name}.crt", cert), key, cert)

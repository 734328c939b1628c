"""A throw-away PKI for the TLS origination tests, minted at test time with ``cryptography`` (ECDSA P-256):
a CA, a server certificate for ``api.example.com`` (+ 127.0.0.1), one for another name, a client certificate,
and a second CA with a client certificate of its own (untrusted by the first)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["SERVER_NAME", "Pki", "make_pki"]

SERVER_NAME = "api.example.com"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    wrong_cert: Path  # signed by ``ca`` for another name
    wrong_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    foreign_cert: Path  # a client certificate signed by ``other_ca``
    foreign_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    cn: str,
    sans: list[x509.GeneralName],
    now: datetime.datetime,
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(out: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> Path:
    path = out / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (out / f"{name}-key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


def make_pki(out: Path) -> Pki:
    """Mint everything into ``out`` (files ``ca.pem``, ``server.pem``, ``server-key.pem``, ...)."""
    now = datetime.datetime.now(datetime.UTC)
    ca = _ca("origination test ca", now)
    other = _ca("another ca", now)
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    server = _leaf(ca, SERVER_NAME, [x509.DNSName(SERVER_NAME), loopback], now, server=True)
    wrong = _leaf(ca, "other.example.org", [x509.DNSName("other.example.org")], now, server=True)
    client = _leaf(
        ca, "client", [x509.UniformResourceIdentifier("spiffe://example.org/client")], now, server=False
    )
    foreign = _leaf(other, "foreign", [], now, server=False)
    return Pki(
        ca=_write(out, "ca", ca[0], None),
        server_cert=_write(out, "server", *server),
        server_key=out / "server-key.pem",
        wrong_cert=_write(out, "wrong", *wrong),
        wrong_key=out / "wrong-key.pem",
        client_cert=_write(out, "client", *client),
        client_key=out / "client-key.pem",
        other_ca=_write(out, "other-ca", other[0], None),
        foreign_cert=_write(out, "foreign", *foreign),
        foreign_key=out / "foreign-key.pem",
    )

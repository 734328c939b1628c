"""Shared fixtures: a frozen instant, a dev CA minted at that instant, and a helper for odd leaves."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authz.identity.ca import CertificateAuthority, Svid, create_ca, issue_svid

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
NOW_TS = NOW.timestamp()
TD = "example.org"
ALICE = f"spiffe://{TD}/ns/shop/sa/alice"
BOB = f"spiffe://{TD}/ns/shop/sa/bob"


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return create_ca(TD, now=NOW - timedelta(days=1))


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    """Same trust domain, different key: certificates it signs are untrusted by ``ca``'s bundle."""
    return create_ca(TD, now=NOW - timedelta(days=1))


@pytest.fixture(scope="session")
def alice(ca: CertificateAuthority) -> Svid:
    return issue_svid(ca, ALICE, now=NOW - timedelta(hours=1))


@pytest.fixture(scope="session")
def bob(ca: CertificateAuthority) -> Svid:
    return issue_svid(ca, BOB, now=NOW - timedelta(hours=1))


def mint_leaf(
    ca: CertificateAuthority,
    sans: Sequence[x509.GeneralName],
    *,
    not_before: datetime = NOW - timedelta(hours=1),
    not_after: datetime = NOW + timedelta(hours=1),
) -> bytes:
    """A leaf signed by ``ca`` with exactly ``sans`` (possibly none): for the bad-certificate cases."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd leaf")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

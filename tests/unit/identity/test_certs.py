"""Peer certificates: URL decoding, SPIFFE ID extraction, validity with a frozen clock, chain to a bundle."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import ConfigError, CredentialError
from authz.identity.ca import CertificateAuthority, Svid
from authz.identity.certs import (
    InvalidPeerCertificate,
    certificate_thumbprint,
    check_certificate_validity,
    decode_peer_certificate,
    load_peer_certificate,
    load_trust_bundle,
    spiffe_id_of,
    thumbprint_from_hex_hash,
    verify_certificate_chain,
)
from authz.identity.spiffe import SpiffeId

from .conftest import ALICE, NOW, NOW_TS, mint_leaf


def envoy_encode(pem: bytes) -> str:
    """What Envoy puts in ``source.certificate``: the PEM, URL-encoded (``%20``, ``%0A``, ``%2B``...)."""
    return quote(pem.decode(), safe="")


def test_decode_envoy_url_encoding(alice: Svid) -> None:
    encoded = envoy_encode(alice.cert_pem)
    assert "%0A" in encoded and "-----BEGIN%20CERTIFICATE-----" in encoded
    assert decode_peer_certificate(encoded) == alice.cert_pem.decode()
    assert decode_peer_certificate(alice.cert_pem.decode()) == alice.cert_pem.decode()  # idempotent on PEM
    assert decode_peer_certificate(encoded.encode()) == alice.cert_pem.decode()
    assert decode_peer_certificate("a%2Bb+c") == "a+b+c"  # '+' is not a space here


@pytest.mark.parametrize("encode", [False, True])
def test_load_leaf(alice: Svid, encode: bool) -> None:
    text = envoy_encode(alice.cert_pem) if encode else alice.cert_pem.decode()
    cert = load_peer_certificate(text)
    assert cert.leaf == x509.load_pem_x509_certificate(alice.cert_pem)
    assert cert.intermediates == ()
    assert cert.uri_sans == (ALICE,)
    assert spiffe_id_of(cert) == SpiffeId.parse(ALICE)


def test_load_with_chain(alice: Svid, ca: CertificateAuthority) -> None:
    cert = load_peer_certificate(alice.cert_pem + ca.cert_pem)
    assert cert.intermediates == (x509.load_pem_x509_certificate(ca.cert_pem),)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "-----BEGIN%20CERTIFICATE-----%0Anot-base64%0A-----END%20CERTIFICATE-----",
        "x" * 70_000,
    ],
)
def test_malformed_certificate(text: str) -> None:
    with pytest.raises(InvalidPeerCertificate) as info:
        load_peer_certificate(text)
    assert info.value.reason == "certificate_malformed"
    assert isinstance(info.value, CredentialError)


def test_thumbprint_is_rfc8705_x5t_s256(alice: Svid) -> None:
    leaf = x509.load_pem_x509_certificate(alice.cert_pem)
    der = leaf.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert certificate_thumbprint(leaf) == expected
    assert len(expected) == 43 and "=" not in expected
    cert = load_peer_certificate(alice.cert_pem)
    assert cert.thumbprint == expected
    assert cert.sha256_hex == hashlib.sha256(der).hexdigest()
    assert thumbprint_from_hex_hash(cert.sha256_hex) == expected


@pytest.mark.parametrize(
    ("sans", "reason"),
    [
        ([], "certificate_no_uri_san"),
        ([x509.DNSName("alice.example.org")], "certificate_no_uri_san"),
        (
            [x509.UniformResourceIdentifier(ALICE), x509.UniformResourceIdentifier("spiffe://example.org/x")],
            "certificate_multiple_uri_sans",
        ),
        ([x509.UniformResourceIdentifier("https://alice.example.org/")], "certificate_uri_not_spiffe"),
        ([x509.UniformResourceIdentifier("urn:uuid:1234")], "certificate_uri_not_spiffe"),
        ([x509.UniformResourceIdentifier("spiffe://example.org/ns/../x")], "certificate_invalid_spiffe_id"),
        ([x509.UniformResourceIdentifier("spiffe://Example.org/x")], "certificate_invalid_spiffe_id"),
    ],
)
def test_spiffe_id_extraction_reasons(
    ca: CertificateAuthority, sans: list[x509.GeneralName], reason: str
) -> None:
    cert = load_peer_certificate(mint_leaf(ca, sans))
    with pytest.raises(InvalidPeerCertificate) as info:
        spiffe_id_of(cert)
    assert info.value.reason == reason


def test_spiffe_id_with_dns_sans_too(ca: CertificateAuthority) -> None:
    pem = mint_leaf(ca, [x509.DNSName("a.example.org"), x509.UniformResourceIdentifier(ALICE)])
    assert str(spiffe_id_of(load_peer_certificate(pem).leaf)) == ALICE


def test_validity_with_frozen_clock(alice: Svid) -> None:
    cert = load_peer_certificate(alice.cert_pem)
    check_certificate_validity(cert, now=NOW_TS)
    not_before = cert.leaf.not_valid_before_utc.timestamp()
    not_after = cert.leaf.not_valid_after_utc.timestamp()
    check_certificate_validity(cert, now=not_before)  # both ends inclusive (RFC 5280 §4.1.2.5)
    check_certificate_validity(cert.leaf, now=not_after)
    with pytest.raises(InvalidPeerCertificate) as info:
        check_certificate_validity(cert, now=not_before - 1)
    assert info.value.reason == "certificate_not_yet_valid"
    with pytest.raises(InvalidPeerCertificate) as info:
        check_certificate_validity(cert, now=not_after + 1)
    assert info.value.reason == "certificate_expired"


def test_chain_to_bundle(alice: Svid, ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    cert = load_peer_certificate(alice.cert_pem)
    roots = load_trust_bundle(ca.cert_pem)
    verify_certificate_chain(cert, roots, now=NOW_TS)
    verify_certificate_chain(cert, load_trust_bundle(other_ca.cert_pem + ca.cert_pem), now=NOW_TS)
    for bundle in (load_trust_bundle(other_ca.cert_pem), ()):
        with pytest.raises(InvalidPeerCertificate) as info:
            verify_certificate_chain(cert, bundle, now=NOW_TS)
        assert info.value.reason == "certificate_untrusted"


def test_chain_checks_time(alice: Svid, ca: CertificateAuthority) -> None:
    cert = load_peer_certificate(alice.cert_pem)
    later = cert.leaf.not_valid_after_utc.timestamp() + timedelta(days=1).total_seconds()
    with pytest.raises(InvalidPeerCertificate) as info:
        verify_certificate_chain(cert, load_trust_bundle(ca.cert_pem), now=later)
    assert info.value.reason == "certificate_untrusted"


def test_expired_and_future_minted_leaves(ca: CertificateAuthority) -> None:
    san = [x509.UniformResourceIdentifier(ALICE)]
    expired = load_peer_certificate(
        mint_leaf(ca, san, not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(days=1))
    )
    future = load_peer_certificate(
        mint_leaf(ca, san, not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=2))
    )
    for cert, reason in ((expired, "certificate_expired"), (future, "certificate_not_yet_valid")):
        with pytest.raises(InvalidPeerCertificate) as info:
            check_certificate_validity(cert, now=NOW_TS)
        assert info.value.reason == reason


def test_bad_trust_bundle_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_trust_bundle(b"nope")
    assert info.value.reason == "invalid_trust_bundle"


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: f"-----BEGIN CERTIFICATE-----\n{t}\n-----END CERTIFICATE-----\n"),
        st.binary(max_size=200).map(
            lambda b: "-----BEGIN%20CERTIFICATE-----%0A" + quote(b) + "%0A-----END%20CERTIFICATE-----"
        ),
    )
)
def test_arbitrary_input_raises_only_our_error(text: str | bytes) -> None:
    try:
        cert = load_peer_certificate(text)
    except InvalidPeerCertificate as exc:
        assert exc.reason == "certificate_malformed"
    else:
        assert isinstance(cert.leaf, x509.Certificate)

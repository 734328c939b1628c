"""Peer identity resolution: order of trust, cross-checks; every bad source is a reason, never an identity."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import quote

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import ConfigError
from authz.identity.ca import CertificateAuthority, Svid, issue_svid
from authz.identity.certs import load_peer_certificate
from authz.identity.peer import PeerIdentity, PeerTrust, RejectedSource, resolve_peer_identity
from authz.identity.spiffe import SpiffeId
from authz.request import HttpAttributes, Peer, Request

from .conftest import ALICE, BOB, NOW, NOW_TS, TD, mint_leaf

XFCC = "x-forwarded-client-cert"
GATEWAY = f"spiffe://{TD}/ns/istio-system/sa/gateway"


def request(
    principal: str = "", certificate: str | bytes = "", xfcc: str | None = None, http: bool = True
) -> Request:
    cert = certificate.decode() if isinstance(certificate, bytes) else certificate
    headers = {} if xfcc is None else {XFCC: xfcc}
    return Request(
        source=Peer(address="10.0.0.1", port=1234, principal=principal, certificate=cert),
        http=HttpAttributes(headers=headers) if http else None,
    )


def resolve(req: Request, trust: PeerTrust | None = None, now: float = NOW_TS) -> PeerIdentity:
    return resolve_peer_identity(req, trust=trust or PeerTrust(), now=now)


def reasons(identity: PeerIdentity) -> list[tuple[str, str]]:
    return [(r.source, r.reason) for r in identity.rejected]


def assert_no_identity(identity: PeerIdentity, source: str, reason: str) -> None:
    assert identity.principal == ""
    assert identity.spiffe_id is None
    assert identity.source == "none"
    assert not identity.authenticated
    assert (source, reason) in reasons(identity)


@pytest.fixture(scope="module")
def bundle_trust(ca: CertificateAuthority) -> PeerTrust:
    return PeerTrust.from_pem(trust_bundle_pem=ca.cert_pem, trust_domain=TD)


def thumb(svid: Svid) -> str:
    return load_peer_certificate(svid.cert_pem).thumbprint


# --- nothing -------------------------------------------------------------------------------------------


def test_no_source_no_identity() -> None:
    identity = resolve(request())
    assert identity == PeerIdentity()
    assert identity.reason == ""
    assert resolve(request(http=False)) == PeerIdentity()


# --- Envoy's principal ---------------------------------------------------------------------------------


def test_principal_alone() -> None:
    identity = resolve(request(principal=ALICE))
    assert identity.principal == ALICE
    assert identity.source == "principal"
    assert identity.certificate_thumbprint == ""
    assert identity.spiffe_id == SpiffeId.parse(ALICE)
    assert (identity.trust_domain, identity.namespace, identity.service_account) == (TD, "shop", "alice")
    assert identity.rejected == ()


@pytest.mark.parametrize("encoded", [False, True])
def test_principal_with_matching_certificate_gives_thumbprint(alice: Svid, encoded: bool) -> None:
    cert = quote(alice.cert_pem.decode(), safe="") if encoded else alice.cert_pem
    identity = resolve(request(principal=ALICE, certificate=cert))
    assert identity.principal == ALICE
    assert identity.source == "principal"
    assert identity.certificate_thumbprint == thumb(alice)


def test_principal_and_certificate_disagree(bob: Svid) -> None:
    identity = resolve(request(principal=ALICE, certificate=bob.cert_pem))
    assert_no_identity(identity, "certificate", "principal_certificate_mismatch")
    assert identity.certificate_thumbprint == ""


@pytest.mark.parametrize(
    ("principal", "reason"),
    [
        ("alice.example.org", "principal_not_spiffe"),  # Envoy falls back to a DNS SAN or the subject
        ("CN=alice,O=shop", "principal_not_spiffe"),
        ("spiffe://example.org/ns/../sa/x", "spiffe_id_dot_segment"),
        ("spiffe://Example.org/ns/a/sa/b", "spiffe_id_bad_trust_domain_char"),
    ],
)
def test_unusable_principal(principal: str, reason: str) -> None:
    assert_no_identity(resolve(request(principal=principal)), "principal", reason)


@pytest.mark.parametrize(
    ("sans", "reason"),
    [
        ([], "certificate_no_uri_san"),
        ([x509.DNSName("alice.example.org")], "certificate_no_uri_san"),
        (
            [x509.UniformResourceIdentifier(ALICE), x509.UniformResourceIdentifier(BOB)],
            "certificate_multiple_uri_sans",
        ),
        ([x509.UniformResourceIdentifier("https://alice.example.org")], "certificate_uri_not_spiffe"),
    ],
)
def test_principal_with_bad_certificate(
    ca: CertificateAuthority, sans: list[x509.GeneralName], reason: str
) -> None:
    identity = resolve(request(principal=ALICE, certificate=mint_leaf(ca, sans)))
    assert_no_identity(identity, "certificate", reason)


def test_principal_with_expired_or_future_certificate(ca: CertificateAuthority) -> None:
    svid = issue_svid(ca, ALICE, now=NOW - timedelta(days=3), validity=timedelta(hours=1))
    assert_no_identity(
        resolve(request(principal=ALICE, certificate=svid.cert_pem)), "certificate", "certificate_expired"
    )
    svid = issue_svid(ca, ALICE, now=NOW + timedelta(hours=1))
    assert_no_identity(
        resolve(request(principal=ALICE, certificate=svid.cert_pem)),
        "certificate",
        "certificate_not_yet_valid",
    )


def test_principal_with_certificate_from_unknown_root(
    other_ca: CertificateAuthority, bundle_trust: PeerTrust
) -> None:
    stranger = issue_svid(other_ca, ALICE, now=NOW - timedelta(hours=1))
    identity = resolve(request(principal=ALICE, certificate=stranger.cert_pem), bundle_trust)
    assert_no_identity(identity, "certificate", "certificate_untrusted")
    # Without a configured bundle, Envoy's verification is what we rely on: accepted.
    assert resolve(request(principal=ALICE, certificate=stranger.cert_pem)).principal == ALICE


def test_malformed_certificate_beside_principal() -> None:
    assert_no_identity(
        resolve(request(principal=ALICE, certificate="garbage")), "certificate", "certificate_malformed"
    )


# --- certificate without principal ---------------------------------------------------------------------


def test_certificate_without_bundle_is_unverified(alice: Svid) -> None:
    assert_no_identity(resolve(request(certificate=alice.cert_pem)), "certificate", "certificate_unverified")


def test_certificate_verified_by_bundle(alice: Svid, bundle_trust: PeerTrust) -> None:
    identity = resolve(request(certificate=alice.cert_pem), bundle_trust)
    assert identity.principal == ALICE
    assert identity.source == "certificate"
    assert identity.certificate_thumbprint == thumb(alice)


def test_certificate_from_unknown_root(other_ca: CertificateAuthority, bundle_trust: PeerTrust) -> None:
    stranger = issue_svid(other_ca, ALICE, now=NOW - timedelta(hours=1))
    assert_no_identity(
        resolve(request(certificate=stranger.cert_pem), bundle_trust), "certificate", "certificate_untrusted"
    )


@pytest.mark.parametrize(
    ("sans", "allowed"),
    [
        ([], {"certificate_no_uri_san"}),
        (
            [x509.UniformResourceIdentifier(ALICE), x509.UniformResourceIdentifier(BOB)],
            {"certificate_multiple_uri_sans"},
        ),
        ([x509.UniformResourceIdentifier("https://a.example.org")], {"certificate_uri_not_spiffe"}),
    ],
)
def test_bad_certificates_with_bundle(
    ca: CertificateAuthority, bundle_trust: PeerTrust, sans: list[x509.GeneralName], allowed: set[str]
) -> None:
    identity = resolve(request(certificate=mint_leaf(ca, sans)), bundle_trust)
    assert identity.principal == ""
    assert identity.reason in allowed


def test_expired_certificate_with_bundle(alice: Svid, bundle_trust: PeerTrust) -> None:
    later = load_peer_certificate(alice.cert_pem).leaf.not_valid_after_utc.timestamp() + 60
    assert_no_identity(
        resolve(request(certificate=alice.cert_pem), bundle_trust, now=later),
        "certificate",
        "certificate_expired",
    )


def test_bundle_vouches_only_for_its_trust_domain(alice: Svid, ca: CertificateAuthority) -> None:
    trust = PeerTrust.from_pem(trust_bundle_pem=ca.cert_pem, trust_domain="other.org")
    assert_no_identity(
        resolve(request(certificate=alice.cert_pem), trust), "certificate", "trust_domain_not_trusted"
    )
    aliased = PeerTrust.from_pem(
        trust_bundle_pem=ca.cert_pem, trust_domain="other.org", trust_domain_aliases=[TD]
    )
    assert resolve(request(certificate=alice.cert_pem), aliased).principal == ALICE


# --- x-forwarded-client-cert ---------------------------------------------------------------------------


def test_xfcc_untrusted_by_default() -> None:
    identity = resolve(request(xfcc=f"URI={ALICE}"))
    assert_no_identity(identity, "xfcc", "xfcc_untrusted")


def test_xfcc_untrusted_is_ignored_beside_a_principal() -> None:
    identity = resolve(request(principal=BOB, xfcc=f"URI={ALICE}"))
    assert identity.principal == BOB
    assert reasons(identity) == [("xfcc", "xfcc_untrusted")]


def test_xfcc_trusted_single_element() -> None:
    identity = resolve(request(xfcc=f"By={GATEWAY};URI={ALICE}"), PeerTrust(trust_xfcc=True, trust_domain=TD))
    assert identity.principal == ALICE
    assert identity.source == "xfcc"
    assert identity.rejected == ()
    assert identity.certificate_thumbprint == ""


def test_xfcc_never_overrides_a_principal() -> None:
    identity = resolve(request(principal=BOB, xfcc=f"URI={ALICE}"), PeerTrust(trust_xfcc=True))
    assert identity.principal == BOB
    assert identity.source == "principal"
    assert identity.rejected == ()


def test_xfcc_is_not_a_fallback_for_a_rejected_principal() -> None:
    identity = resolve(request(principal="not-spiffe", xfcc=f"URI={ALICE}"), PeerTrust(trust_xfcc=True))
    assert_no_identity(identity, "principal", "principal_not_spiffe")


def test_xfcc_hash_gives_thumbprint(alice: Svid) -> None:
    cert = load_peer_certificate(alice.cert_pem)
    identity = resolve(request(xfcc=f"Hash={cert.sha256_hex};URI={ALICE}"), PeerTrust(trust_xfcc=True))
    assert identity.certificate_thumbprint == cert.thumbprint


def _xfcc_cert(svid: Svid) -> str:
    return '"' + quote(svid.cert_pem.decode(), safe="") + '"'


def test_xfcc_with_certificate(alice: Svid, bundle_trust: PeerTrust) -> None:
    digest = hashlib.sha256(load_peer_certificate(alice.cert_pem).der).hexdigest()
    value = f"By={GATEWAY};Hash={digest};Cert={_xfcc_cert(alice)};URI={ALICE}"
    trust = PeerTrust(trust_xfcc=True, trust_bundle=bundle_trust.trust_bundle, trust_domain=TD)
    identity = resolve(request(xfcc=value), trust)
    assert identity.principal == ALICE
    assert identity.certificate_thumbprint == thumb(alice)


@pytest.fixture(scope="module")
def three_svids(alice: Svid, bob: Svid, other_ca: CertificateAuthority) -> tuple[Svid, Svid, Svid]:
    """Alice, Bob, and a stranger claiming to be Alice with a certificate from an unknown root."""
    return alice, bob, issue_svid(other_ca, ALICE, now=NOW - timedelta(hours=1))


@pytest.mark.parametrize(
    ("make_value", "reason"),
    [
        (lambda a, b, s: f"Cert={_xfcc_cert(b)};URI={ALICE}", "xfcc_uri_certificate_mismatch"),
        (lambda a, b, s: f"Hash={'0' * 64};Cert={_xfcc_cert(a)};URI={ALICE}", "xfcc_hash_mismatch"),
        (lambda a, b, s: f"Cert={_xfcc_cert(s)};URI={ALICE}", "certificate_untrusted"),
        (lambda a, b, s: 'Cert="garbage";URI=' + ALICE, "certificate_malformed"),
        (lambda a, b, s: f"URI={ALICE},URI={BOB}", "xfcc_multiple_elements"),
        (lambda a, b, s: f"URI={ALICE};URI={BOB}", "xfcc_multiple_uris"),
        (lambda a, b, s: f"By={GATEWAY};DNS=alice.example.org", "xfcc_no_uri"),
        (lambda a, b, s: "URI=https://alice.example.org", "xfcc_uri_not_spiffe"),
        (lambda a, b, s: "URI=spiffe://example.org/ns//x", "spiffe_id_empty_segment"),
        (lambda a, b, s: f"By=spiffe://evil.org/proxy;URI={ALICE}", "xfcc_by_foreign_trust_domain"),
        (lambda a, b, s: f"By=http://frontend;URI={ALICE}", "xfcc_by_not_spiffe"),
        (lambda a, b, s: f'URI="{ALICE}', "xfcc_malformed"),
        (lambda a, b, s: f"By={GATEWAY};By={GATEWAY};URI={ALICE}", "xfcc_duplicate_key"),
        (lambda a, b, s: "", "xfcc_empty"),
    ],
)
def test_xfcc_bad_input_never_becomes_an_identity(
    three_svids: tuple[Svid, Svid, Svid],
    bundle_trust: PeerTrust,
    make_value: Callable[[Svid, Svid, Svid], str],
    reason: str,
) -> None:
    trust = PeerTrust(trust_xfcc=True, trust_bundle=bundle_trust.trust_bundle, trust_domain=TD)
    identity = resolve(request(xfcc=make_value(*three_svids)), trust)
    assert_no_identity(identity, "xfcc", reason)


def test_duplicated_xfcc_headers_joined_by_the_front_are_refused() -> None:
    # HttpAttributes joins repeated headers with ',' (authz.request); two headers look like two elements.
    joined = ",".join([f"By={GATEWAY};URI={ALICE}", f"By={GATEWAY};URI={BOB}"])
    identity = resolve(request(xfcc=joined), PeerTrust(trust_xfcc=True))
    assert_no_identity(identity, "xfcc", "xfcc_multiple_elements")


def test_xfcc_custom_header_name() -> None:
    req = Request(http=HttpAttributes(headers={"x-client-identity": f"URI={ALICE}"}))
    assert resolve(req, PeerTrust(trust_xfcc=True, xfcc_header="X-Client-Identity")).principal == ALICE


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100), st.booleans())
def test_arbitrary_xfcc_never_raises(value: str, trusted: bool) -> None:
    identity = resolve(request(xfcc=value), PeerTrust(trust_xfcc=trusted))
    if identity.principal:
        assert trusted and identity.source == "xfcc"
        assert SpiffeId.parse(identity.principal) == identity.spiffe_id
    else:
        assert identity.rejected and all(isinstance(r, RejectedSource) for r in identity.rejected)


def test_peer_trust_validates_trust_domains() -> None:
    with pytest.raises(ConfigError) as info:
        PeerTrust(trust_domain="Not Valid")
    assert info.value.reason == "spiffe_id_bad_trust_domain_char"
    with pytest.raises(ConfigError):
        PeerTrust(trust_domain="td", trust_domain_aliases=("UPPER",))
    assert PeerTrust().is_local("anything")
    assert PeerTrust(trust_domain=TD, trust_domain_aliases=("old.org",)).is_local("old.org")
    assert not PeerTrust(trust_domain=TD).is_local("old.org")

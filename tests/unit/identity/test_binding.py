"""RFC 8705 certificate-bound tokens and SPIFFE-ID-bound claims, with certificates minted by the dev CA."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import ConfigError, CredentialError
from authz.identity.binding import (
    BINDING_PLACEHOLDERS,
    check_certificate_binding,
    check_spiffe_binding,
    compile_binding_pattern,
)
from authz.identity.ca import Svid
from authz.identity.certs import load_peer_certificate

from .conftest import ALICE

BOUND = "x5t#S256"


@pytest.fixture(scope="module")
def alice_thumb(alice: Svid) -> str:
    return load_peer_certificate(alice.cert_pem).thumbprint


@pytest.fixture(scope="module")
def bob_thumb(bob: Svid) -> str:
    return load_peer_certificate(bob.cert_pem).thumbprint


def reason_of(claims: dict[str, Any], thumbprint: str, mode: str) -> str:
    try:
        check_certificate_binding(claims, thumbprint, mode=mode)  # type: ignore[arg-type]
    except CredentialError as exc:
        assert exc.status == 401
        assert 'error="invalid_token"' in exc.www_authenticate
        return exc.reason
    return "ok"


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_bound_token_from_its_certificate(alice_thumb: str, mode: str) -> None:
    assert reason_of({"cnf": {BOUND: alice_thumb}}, alice_thumb, mode) == "ok"
    assert reason_of({"cnf": {BOUND: alice_thumb + "="}}, alice_thumb, mode) == "ok"  # padding tolerated


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_bound_token_from_another_certificate(alice_thumb: str, bob_thumb: str, mode: str) -> None:
    assert reason_of({"cnf": {BOUND: alice_thumb}}, bob_thumb, mode) == "certificate_binding_mismatch"


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_bound_token_without_certificate(alice_thumb: str, mode: str) -> None:
    assert reason_of({"cnf": {BOUND: alice_thumb}}, "", mode) == "certificate_required"


@pytest.mark.parametrize(
    ("claims", "required", "optional"),
    [
        ({}, "certificate_binding_missing", "ok"),
        ({"cnf": {"jkt": "dpop-thumbprint"}}, "certificate_binding_missing", "ok"),  # bound by other means
        ({"cnf": "x"}, "certificate_binding_malformed", "certificate_binding_malformed"),
        ({"cnf": {BOUND: 42}}, "certificate_binding_malformed", "certificate_binding_malformed"),
        ({"cnf": {BOUND: ""}}, "certificate_binding_malformed", "certificate_binding_malformed"),
    ],
)
def test_unbound_and_malformed(
    alice_thumb: str, claims: dict[str, Any], required: str, optional: str
) -> None:
    assert reason_of(claims, alice_thumb, "required") == required
    assert reason_of(claims, alice_thumb, "optional") == optional


def test_disabled_checks_nothing(alice_thumb: str, bob_thumb: str) -> None:
    assert reason_of({"cnf": {BOUND: alice_thumb}}, bob_thumb, "disabled") == "ok"
    assert reason_of({"cnf": "junk"}, "", "disabled") == "ok"


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=50), st.text(max_size=50))
def test_only_equal_thumbprints_pass(bound: str, presented: str) -> None:
    got = reason_of({"cnf": {BOUND: bound}}, presented, "required")
    if got == "ok":
        assert bound.rstrip("=") == presented.rstrip("=")
    else:
        assert got in {
            "certificate_binding_mismatch",
            "certificate_required",
            "certificate_binding_malformed",
        }


# --- SPIFFE binding ------------------------------------------------------------------------------------


def spiffe_reason(claims: dict[str, Any], peer: str, pattern: str | None = None, claim: str = "sub") -> str:
    try:
        check_spiffe_binding(claims, claim=claim, peer_spiffe_id=peer, pattern=pattern)
    except CredentialError as exc:
        assert exc.status == 401
        return exc.reason
    return "ok"


def test_claim_equals_spiffe_id() -> None:
    assert spiffe_reason({"sub": ALICE}, ALICE) == "ok"
    assert spiffe_reason({"sub": ALICE + "x"}, ALICE) == "spiffe_binding_mismatch"
    assert spiffe_reason({"sub": ALICE.upper()}, ALICE) == "spiffe_binding_mismatch"
    assert spiffe_reason({"client_id": ALICE}, ALICE, claim="client_id") == "ok"


def test_missing_claim_or_peer() -> None:
    assert spiffe_reason({}, ALICE) == "spiffe_binding_claim_missing"
    assert spiffe_reason({"sub": ["a"]}, ALICE) == "spiffe_binding_claim_missing"
    assert spiffe_reason({"sub": ALICE}, "") == "peer_identity_required"


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("system:serviceaccount:{namespace}:{service_account}", "system:serviceaccount:shop:alice"),
        ("{trust_domain}", "example.org"),
        ("{principal}", "example.org/ns/shop/sa/alice"),
        ("{spiffe_id}", ALICE),
        ("wl{path}", "wl/ns/shop/sa/alice"),
        ("{{literal}}-{service_account}", "{literal}-alice"),
        ("static", "static"),
    ],
)
def test_patterns(pattern: str, value: str) -> None:
    assert spiffe_reason({"sub": value}, ALICE, pattern) == "ok"
    assert spiffe_reason({"sub": value + "!"}, ALICE, pattern) == "spiffe_binding_mismatch"


def test_istio_placeholders_never_match_other_shapes() -> None:
    pattern = "system:serviceaccount:{namespace}:{service_account}"
    assert spiffe_reason({"sub": "system:serviceaccount::"}, "spiffe://example.org/job/42", pattern) == (
        "spiffe_binding_mismatch"
    )


@pytest.mark.parametrize("pattern", ["{nope}", "{namespace", "a}b", "{}", "{{namespace}"])
def test_bad_patterns_are_config_errors(pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_binding_pattern(pattern)
    assert info.value.reason == "invalid_binding_pattern"
    with pytest.raises(ConfigError):
        check_spiffe_binding({"sub": "x"}, claim="sub", peer_spiffe_id=ALICE, pattern=pattern)


def test_compiled_pattern_parts() -> None:
    compiled = compile_binding_pattern("ns={namespace}")
    assert compiled.parts == ((False, "ns="), (True, "namespace"))
    assert {name for is_ph, name in compiled.parts if is_ph} <= BINDING_PLACEHOLDERS

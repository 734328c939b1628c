from __future__ import annotations

import base64
from urllib.parse import quote_plus, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.idp import rfc7636
from authz.idp.rfc6749 import (
    MAX_FORM_BYTES,
    OAuthError,
    invalid_client,
    parse_basic_authorization,
    parse_form,
)

FORM = "application/x-www-form-urlencoded"


def test_form_is_parsed_and_blank_values_count_as_omitted() -> None:
    assert parse_form(b"grant_type=client_credentials&scope=a+b&x=", FORM + "; charset=UTF-8") == {
        "grant_type": "client_credentials",
        "scope": "a b",
    }
    assert parse_form(b"", FORM) == {}


@pytest.mark.parametrize(
    ("body", "ctype", "message"),
    [
        (b"a=1&a=2", FORM, "repeated"),
        (b'{"a": 1}', "application/json", "x-www-form-urlencoded"),
        (b"a=1", "", "x-www-form-urlencoded"),
        (b"\xff\xfe=1", FORM, "not a valid form"),
        (b"novalue&&", FORM, "not a valid form"),
        (b"a=" + b"x" * MAX_FORM_BYTES, FORM, "too large"),
    ],
)
def test_malformed_forms_are_invalid_request(body: bytes, ctype: str, message: str) -> None:
    with pytest.raises(OAuthError) as info:
        parse_form(body, ctype)
    assert (info.value.error, info.value.status) == ("invalid_request", 400)
    assert message in info.value.description


_NAMES = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=10)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_NAMES, _NAMES, max_size=6))
def test_form_round_trips_any_utf8(params: dict[str, str]) -> None:
    assert parse_form(urlencode(params).encode(), FORM) == params


def test_basic_credentials_are_form_decoded() -> None:
    """RFC 6749 section 2.3.1: id and secret are form-urlencoded before base64."""
    raw = f"{quote_plus('my:client')}:{quote_plus('s3cr:t +')}".encode()
    creds = parse_basic_authorization("Basic " + base64.b64encode(raw).decode())
    assert creds is not None
    assert (creds.client_id, creds.client_secret) == ("my:client", "s3cr:t +")
    assert parse_basic_authorization("Bearer abc") is None


@pytest.mark.parametrize("header", ["Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode()])
def test_malformed_basic_is_invalid_client_with_challenge(header: str) -> None:
    with pytest.raises(OAuthError) as info:
        parse_basic_authorization(header)
    assert (info.value.error, info.value.status) == ("invalid_client", 401)
    assert info.value.headers()["WWW-Authenticate"].startswith("Basic ")


def test_error_body_and_headers() -> None:
    err = OAuthError("invalid_grant", "code expired")
    assert err.body() == {"error": "invalid_grant", "error_description": "code expired"}
    assert err.headers() == {"Cache-Control": "no-store", "Pragma": "no-cache"}
    assert err.reason == "invalid_grant"
    assert "WWW-Authenticate" not in invalid_client("x", basic=False).headers()


def test_rfc7636_appendix_b_vector() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    rfc7636.check_challenge(challenge, "S256")
    rfc7636.verify(verifier, challenge)
    with pytest.raises(OAuthError) as info:
        rfc7636.verify(verifier[:-1] + "l", challenge)
    assert info.value.error == "invalid_grant"


@pytest.mark.parametrize(
    ("challenge", "method"), [("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "plain"), ("short", "S256")]
)
def test_bad_challenges_are_invalid_request(challenge: str, method: str) -> None:
    with pytest.raises(OAuthError) as info:
        rfc7636.check_challenge(challenge, method)
    assert info.value.error == "invalid_request"


@settings(max_examples=50, deadline=None)
@given(
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~",
        min_size=43,
        max_size=128,
    )
)
def test_any_valid_verifier_matches_its_own_challenge_only(verifier: str) -> None:
    from authlib.oauth2.rfc7636 import create_s256_code_challenge

    challenge = create_s256_code_challenge(verifier)
    rfc7636.check_challenge(challenge, "S256")
    rfc7636.verify(verifier, challenge)
    with pytest.raises(OAuthError):
        rfc7636.verify(verifier + "x" if len(verifier) < 128 else verifier[:-1], challenge)

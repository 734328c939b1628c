"""verify(): algorithms, key selection, claims, and the exact reasons and statuses of failures."""

from __future__ import annotations

import dataclasses

import pytest
from authn_kit import ISSUER, NOW, claims

from authz.authn.jwk import KeySet, hmac_key, parse_jwks
from authz.authn.jwt import VerifiedToken, verify
from authz.authn.model import JwtRule
from authz.authn.settings import IssuerSettings
from authz.authn.testing import SigningKey, jwks_document
from authz.errors import CredentialError

ALL_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


def check(token: str, keys: KeySet, rule: JwtRule | None = None, **settings: object) -> VerifiedToken:
    s = IssuerSettings(issuer=ISSUER, **settings)  # type: ignore[arg-type]
    return verify(token, keys, now=NOW, rule=rule or JwtRule(issuer=ISSUER), settings=s)


def reason_of(token: str, keys: KeySet, rule: JwtRule | None = None, **settings: object) -> tuple[str, int]:
    with pytest.raises(CredentialError) as info:
        check(token, keys, rule, **settings)
    return info.value.reason, info.value.status


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_every_supported_algorithm_verifies(alg: str) -> None:
    key = SigningKey.generate(alg, kid=f"k-{alg}")
    keys = parse_jwks(jwks_document(key), source="t").keys
    vt = check(key.sign(claims()), keys)
    assert vt.algorithm == alg
    assert vt.claims["sub"] == "alice"
    assert vt.kid == f"k-{alg}"
    assert vt.key_fingerprint == keys.keys[0].fingerprint
    assert vt.expires_at == NOW + 600


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_every_algorithm_rejects_a_tampered_payload(alg: str) -> None:
    key = SigningKey.generate(alg, kid="k")
    keys = parse_jwks(jwks_document(key), source="t").keys
    token = key.sign(claims())
    other = key.sign(claims(sub="mallory"))
    forged = token.split(".")[0] + "." + other.split(".")[1] + "." + token.split(".")[2]
    assert reason_of(forged, keys) == ("bad_signature", 401)


def test_payload_segment_is_the_tokens_second_segment(rsa_key: SigningKey, keyset: KeySet) -> None:
    token = rsa_key.sign(claims())
    assert check(token, keyset).payload_segment == token.split(".")[1]


def test_token_without_kid_tries_every_key_of_the_algorithm(es_key: SigningKey, keyset: KeySet) -> None:
    anon = dataclasses.replace(es_key, kid=None)
    assert check(anon.sign(claims()), keyset).kid is None


def test_kid_not_in_key_set_is_unknown_kid(rsa_key: SigningKey, keyset: KeySet) -> None:
    stranger = dataclasses.replace(rsa_key, kid="nope")
    assert reason_of(stranger.sign(claims()), keyset) == ("unknown_kid", 401)


def test_kid_of_a_key_with_another_algorithm_is_unknown_kid(keyset: KeySet) -> None:
    liar = SigningKey.generate("ES256", kid="rsa-1")  # the kid of the RSA key, but an EC signature
    assert reason_of(liar.sign(claims()), keyset) == ("unknown_kid", 401)


def test_signature_by_another_key_with_same_kid_is_bad_signature(keyset: KeySet) -> None:
    impostor = SigningKey.generate("ES256", kid="ec-1")
    assert reason_of(impostor.sign(claims()), keyset) == ("bad_signature", 401)


def test_expiry_honours_the_default_60s_clock_skew(rsa_key: SigningKey, keyset: KeySet) -> None:
    check(rsa_key.sign(claims(exp=NOW - 59)), keyset)
    assert reason_of(rsa_key.sign(claims(exp=NOW - 61)), keyset) == ("expired", 401)


def test_configured_clock_skew_applies(rsa_key: SigningKey, keyset: KeySet) -> None:
    assert reason_of(rsa_key.sign(claims(exp=NOW - 5)), keyset, clock_skew=0.0) == ("expired", 401)


def test_nbf_in_the_future_beyond_skew_is_not_yet_valid(rsa_key: SigningKey, keyset: KeySet) -> None:
    check(rsa_key.sign(claims(nbf=NOW + 59)), keyset)
    assert reason_of(rsa_key.sign(claims(nbf=NOW + 61)), keyset) == ("not_yet_valid", 401)


def test_iat_far_in_the_future_is_not_yet_valid(rsa_key: SigningKey, keyset: KeySet) -> None:
    assert reason_of(rsa_key.sign(claims(iat=NOW + 3600)), keyset) == ("not_yet_valid", 401)


def test_token_without_exp_is_accepted_unless_required(rsa_key: SigningKey, keyset: KeySet) -> None:
    token = rsa_key.sign(claims(exp=None))
    assert check(token, keyset).expires_at is None
    assert reason_of(token, keyset, required_claims=("exp",)) == ("missing_claim", 401)


def test_issuer_mismatch_is_issuer_not_configured(rsa_key: SigningKey, keyset: KeySet) -> None:
    token = rsa_key.sign(claims(iss="https://other.test"))
    assert reason_of(token, keyset) == ("issuer_not_configured", 401)


def test_rule_without_issuer_accepts_any_iss(rsa_key: SigningKey, keyset: KeySet) -> None:
    token = rsa_key.sign(claims(iss="https://whoever.test"))
    assert check(token, keyset, JwtRule(jwks_uri="https://keys.test/jwks")).issuer == "https://whoever.test"


@pytest.mark.parametrize("aud", ["api", ["other", "api"]])
def test_audience_string_or_list_matches(rsa_key: SigningKey, keyset: KeySet, aud: object) -> None:
    check(rsa_key.sign(claims(aud=aud)), keyset, JwtRule(issuer=ISSUER, audiences=("api", "web")))


@pytest.mark.parametrize("aud", ["other", ["x", "y"], None])
def test_audience_mismatch_is_403(rsa_key: SigningKey, keyset: KeySet, aud: object) -> None:
    rule = JwtRule(issuer=ISSUER, audiences=("api",))
    assert reason_of(rsa_key.sign(claims(aud=aud)), keyset, rule) == ("audience_not_allowed", 403)


def test_empty_audiences_do_not_check_aud(rsa_key: SigningKey, keyset: KeySet) -> None:
    check(rsa_key.sign(claims(aud="anything")), keyset)


def test_hmac_tokens_verify_only_with_settings_secrets() -> None:
    key = SigningKey.generate("HS256", kid="legacy")
    token = key.sign(claims())
    hk = hmac_key(key.private, kid="legacy", algorithm="HS256")
    assert check(token, KeySet(), hmac_keys=(hk,)).algorithm == "HS256"
    assert reason_of(token, KeySet()) == ("unknown_kid", 401)


def test_hmac_secret_shorter_than_the_hash_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        hmac_key(b"short", kid=None, algorithm="HS256")


def test_token_too_large(rsa_key: SigningKey, keyset: KeySet) -> None:
    token = rsa_key.sign(claims(blob="x" * 20_000))
    assert reason_of(token, keyset) == ("token_too_large", 401)
    check(token, keyset, max_token_bytes=64_000)


def test_error_messages_follow_jwt_verify_lib(rsa_key: SigningKey, keyset: KeySet) -> None:
    with pytest.raises(CredentialError, match=r"^Jwt is expired$"):
        check(rsa_key.sign(claims(exp=NOW - 3600)), keyset)
    with pytest.raises(CredentialError, match="two dots and 3 sections"):
        check("abc.def", keyset)
    with pytest.raises(CredentialError) as info:
        check(rsa_key.sign(claims(aud="x")), keyset, JwtRule(issuer=ISSUER, audiences=("y",)))
    assert info.value.message == "Audiences in Jwt are not allowed"
    assert 'error="insufficient_scope"' in info.value.www_authenticate


def test_cnf_thumbprint_and_binding_settings_are_exposed(rsa_key: SigningKey, keyset: KeySet) -> None:
    vt = check(rsa_key.sign(claims(cnf={"x5t#S256": "abc"})), keyset)
    assert vt.cnf_x5t_s256 == "abc"
    assert vt.certificate_binding.value == "disabled"
    assert vt.spiffe_binding is None


def test_a_caller_decoded_token_verifies_the_same_and_keeps_the_size_limit() -> None:
    """The authenticator decodes once (to find the issuer) and hands the result to verify()."""
    from authz.authn.jwt import decode_unverified

    key = SigningKey.generate("ES256", kid="k")
    keys = parse_jwks(jwks_document(key), source="t").keys
    token = key.sign(claims())
    decoded = decode_unverified(token, max_bytes=1 << 20)
    settings = IssuerSettings(issuer=ISSUER)
    plain = verify(token, keys, now=NOW, rule=JwtRule(issuer=ISSUER), settings=settings)
    given = verify(token, keys, now=NOW, rule=JwtRule(issuer=ISSUER), settings=settings, decoded=decoded)
    assert (given.claims, given.kid, given.key_fingerprint) == (
        plain.claims,
        plain.kid,
        plain.key_fingerprint,
    )
    small = IssuerSettings(issuer=ISSUER, max_token_bytes=len(token) - 1)
    with pytest.raises(CredentialError) as info:
        verify(token, keys, now=NOW, rule=JwtRule(issuer=ISSUER), settings=small, decoded=decoded)
    assert info.value.reason == "token_too_large"


def test_duplicate_members_and_deep_nesting_are_still_refused() -> None:
    """The cheaper duplicate and depth checks refuse what the per-member ones did."""
    from authz.authn.jwt import MAX_JSON_DEPTH
    from authz.authn.testing import b64url

    key = SigningKey.generate("ES256", kid="k")
    keys = parse_jwks(jwks_document(key), source="t").keys
    header = b64url(b'{"alg":"ES256","kid":"k"}')
    duplicate = b'{"iss":"' + ISSUER.encode() + b'","sub":"a","sub":"b"}'
    deep = b'{"iss":"' + ISSUER.encode() + b'","x":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    for payload, says in ((duplicate, "duplicate member 'sub'"), (deep, "nested deeper")):
        token = f"{header}.{b64url(payload)}.{b64url(b'sig')}"
        with pytest.raises(CredentialError) as info:
            check(token, keys)
        assert info.value.reason == "malformed_token" and says in info.value.message, info.value.message
    shallow = b'{"iss":"' + ISSUER.encode() + b'","x":"' + b"[{" * 40 + b'"}'  # brackets inside a string
    token = f"{header}.{b64url(shallow)}.{b64url(b'sig')}"
    assert reason_of(token, keys) == ("bad_signature", 401)  # decoded fine; only the signature is wrong

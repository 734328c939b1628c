"""One regression test per known JWT attack class, named after its advisory where one exists.

Every attack must end in a CredentialError with status 401 (never another exception type, never a
pass). Modelled on pyjwt's tests/test_advisory.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from authn_kit import ISSUER, NOW, claims
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.authn.jwk import KeySet, hmac_key, parse_jwks
from authz.authn.jwt import verify
from authz.authn.model import JwtRule
from authz.authn.settings import IssuerSettings
from authz.authn.testing import SigningKey, b64url, compact, jwks_document
from authz.errors import CredentialError

RULE = JwtRule(issuer=ISSUER)
SETTINGS = IssuerSettings(issuer=ISSUER)


def rejected(token: str, keys: KeySet, settings: IssuerSettings = SETTINGS) -> str:
    """Assert the token is refused with a 401 CredentialError; return the reason."""
    with pytest.raises(CredentialError) as info:
        verify(token, keys, now=NOW, rule=RULE, settings=settings)
    assert info.value.status == 401
    return info.value.reason


def signed_with(key: SigningKey, header: dict[str, object], payload: dict[str, object] | str) -> str:
    """Sign arbitrary header/payload JSON (strings verbatim) with ``key``'s private key."""
    h = b64url(json.dumps(header).encode())
    p = b64url((payload if isinstance(payload, str) else json.dumps(payload)).encode())
    return f"{h}.{p}.{b64url(key.raw_sign(f'{h}.{p}'.encode()))}"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(alg: str, keyset: KeySet) -> None:
    token = compact({"alg": alg, "kid": "rsa-1"}, claims())
    assert rejected(token, keyset) == "unsupported_algorithm"
    assert rejected(token + "c2ln", keyset) == "unsupported_algorithm"


@pytest.mark.parametrize("material", ["pem", "der", "jwk_n"])
def test_cve_2015_9235_and_cve_2022_29217_hs256_signed_with_the_rsa_public_key(
    material: str, rsa_key: SigningKey, keyset: KeySet
) -> None:
    pub = rsa_key.private.public_key()
    secret = {
        "pem": pub.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        "der": pub.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        "jwk_n": base64.urlsafe_b64decode(rsa_key.public_jwk()["n"] + "=="),
    }[material]
    forger = SigningKey("HS256", "rsa-1", secret)
    token = forger.sign(claims(sub="admin"))
    assert rejected(token, keyset) == "unknown_kid"
    # Even with a legacy HMAC secret configured for that kid, the public key is not it.
    legit = hmac_key(b"s" * 32, kid="rsa-1", algorithm="HS256")
    assert rejected(token, keyset, dataclasses.replace(SETTINGS, hmac_keys=(legit,))) == "bad_signature"


def test_cve_2018_0114_embedded_jwk_header_is_never_trusted(keyset: KeySet) -> None:
    attacker = SigningKey.generate("RS256", kid="rsa-1")
    token = attacker.sign(claims(sub="admin"), header={"jwk": attacker.public_jwk()})
    assert rejected(token, keyset) == "bad_signature"


@pytest.mark.parametrize("param", ["jku", "x5u"])
def test_jku_and_x5u_headers_are_never_followed(param: str, keyset: KeySet) -> None:
    attacker = SigningKey.generate("ES256", kid="attacker")
    token = attacker.sign(claims(), header={param: "https://attacker.test/jwks.json"})
    assert rejected(token, keyset) == "unknown_kid"


def test_x5c_header_certificate_is_never_trusted(keyset: KeySet) -> None:
    attacker = SigningKey.generate("ES256", kid="ec-1")
    token = attacker.sign(claims(), header={"x5c": ["MIIBfake"]})
    assert rejected(token, keyset) == "bad_signature"


@pytest.mark.parametrize(
    "kid",
    ["../../../../dev/null", "/etc/passwd", "' OR '1'='1", "x'; DROP TABLE keys;--", "\u0000", "rsa-1\u0000"],
)
def test_kid_injection_is_only_ever_a_lookup_key(kid: str, keyset: KeySet) -> None:
    attacker = SigningKey.generate("ES256", kid=kid)
    assert rejected(attacker.sign(claims()), keyset) == "unknown_kid"


def test_kid_that_is_not_a_short_string_is_malformed(keyset: KeySet) -> None:
    assert rejected(compact({"alg": "RS256", "kid": 7}, claims()), keyset) == "malformed_token"
    assert rejected(compact({"alg": "RS256", "kid": "k" * 5000}, claims()), keyset) == "malformed_token"


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_cve_2022_21449_psychic_signatures_r_s_zero(alg: str) -> None:
    key = SigningKey.generate(alg, kid="ec")
    keys = parse_jwks(jwks_document(key), source="t").keys
    size = {"ES256": 32, "ES384": 48, "ES512": 66}[alg]
    good = key.sign(claims())
    head, payload, _ = good.split(".")
    assert rejected(f"{head}.{payload}.{b64url(bytes(2 * size))}", keys) == "bad_signature"


def test_ecdsa_r_or_s_equal_to_the_group_order_is_refused(es_key: SigningKey, keyset: KeySet) -> None:
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    head, payload, _ = es_key.sign(claims()).split(".")
    sig = n.to_bytes(32, "big") + n.to_bytes(32, "big")
    assert rejected(f"{head}.{payload}.{b64url(sig)}", keyset) == "bad_signature"


def test_ecdsa_der_encoded_signature_is_refused(es_key: SigningKey, keyset: KeySet) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    head, payload, _ = es_key.sign(claims()).split(".")
    der = es_key.private.sign(f"{head}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    assert rejected(f"{head}.{payload}.{b64url(der)}", keyset) == "bad_signature"


def test_signature_stripping_is_refused(rsa_key: SigningKey, keyset: KeySet) -> None:
    head, payload, _ = rsa_key.sign(claims()).split(".")
    assert rejected(f"{head}.{payload}.", keyset) == "bad_signature"


def test_algorithm_comes_from_the_jwk_not_the_token(rsa_key: SigningKey) -> None:
    # The JWK says RS256; a PS256 signature by the same private key must not be accepted.
    keys = parse_jwks(jwks_document(rsa_key), source="t").keys
    ps = SigningKey("PS256", rsa_key.kid, rsa_key.private)
    assert rejected(ps.sign(claims()), keys) == "unknown_kid"


@pytest.mark.parametrize("crit", [["exp"], ["http://example.invalid/ext"], ["b64"]])
def test_unknown_crit_extension_is_refused(crit: list[str], rsa_key: SigningKey, keyset: KeySet) -> None:
    token = rsa_key.sign(claims(), header={"crit": crit, crit[0]: True})
    assert rejected(token, keyset) == "unsupported_critical_header"


def test_malformed_crit_is_refused(rsa_key: SigningKey, keyset: KeySet) -> None:
    assert rejected(rsa_key.sign(claims(), header={"crit": []}), keyset) == "malformed_token"
    assert rejected(rsa_key.sign(claims(), header={"crit": "exp"}), keyset) == "malformed_token"


def test_rfc7797_unencoded_payload_is_refused(rsa_key: SigningKey, keyset: KeySet) -> None:
    assert rejected(rsa_key.sign(claims(), header={"b64": False}), keyset) == "unsupported_critical_header"


def test_duplicate_member_in_header_is_refused(rsa_key: SigningKey, keyset: KeySet) -> None:
    h = b64url(b'{"alg":"RS256","kid":"rsa-1","alg":"none"}')
    p = b64url(json.dumps(claims()).encode())
    token = f"{h}.{p}.{b64url(rsa_key.raw_sign(f'{h}.{p}'.encode()))}"
    assert rejected(token, keyset) == "malformed_token"


def test_duplicate_claims_in_payload_are_refused(rsa_key: SigningKey, keyset: KeySet) -> None:
    payload = json.dumps(claims())[:-1] + ', "sub": "admin"}'
    token = signed_with(rsa_key, {"alg": "RS256", "kid": "rsa-1"}, payload)
    assert rejected(token, keyset) == "malformed_token"


def test_oversized_token_is_refused_before_parsing(keyset: KeySet) -> None:
    token = "a" * 100_000 + ".b.c"
    assert rejected(token, keyset) == "token_too_large"


@pytest.mark.parametrize("depth", [17, 5000])
def test_deeply_nested_payload_is_refused(depth: int, rsa_key: SigningKey, keyset: KeySet) -> None:
    payload = json.dumps(claims())[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    token = signed_with(rsa_key, {"alg": "RS256", "kid": "rsa-1"}, payload)
    big = dataclasses.replace(SETTINGS, max_token_bytes=100_000)
    assert rejected(token, keyset, big) == "malformed_token"


@pytest.mark.parametrize(
    ("claim", "value"),
    [("exp", "9999999999"), ("exp", True), ("exp", None), ("nbf", "0"), ("iat", [1]), ("exp", {"a": 1})],
)
def test_non_numeric_time_claims_are_refused(
    claim: str, value: object, rsa_key: SigningKey, keyset: KeySet
) -> None:
    payload = {**claims(), claim: value}
    assert (
        rejected(signed_with(rsa_key, {"alg": "RS256", "kid": "rsa-1"}, payload), keyset) == "invalid_claim"
    )


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_json_numbers_are_refused(bad: str, rsa_key: SigningKey, keyset: KeySet) -> None:
    payload = json.dumps(claims())[:-1] + f', "x": {bad}' + "}"
    assert (
        rejected(signed_with(rsa_key, {"alg": "RS256", "kid": "rsa-1"}, payload), keyset) == "malformed_token"
    )


@pytest.mark.parametrize("mutation", ["pad_header", "pad_signature", "space", "newline", "std_alphabet"])
def test_non_canonical_or_padded_base64_is_refused(
    mutation: str, rsa_key: SigningKey, keyset: KeySet
) -> None:
    head, payload, sig = rsa_key.sign(claims()).split(".")
    token = {
        "pad_header": f"{head}==.{payload}.{sig}",
        "pad_signature": f"{head}.{payload}.{sig}=",
        "space": f"{head}.{payload[:5]} {payload[5:]}.{sig}",
        "newline": f"{head}.{payload}\n.{sig}",
        "std_alphabet": f"{head}.{payload}.{sig.replace('-', '+').replace('_', '/')}" + "+",
    }[mutation]
    assert rejected(token, keyset) == "malformed_token"


def test_non_canonical_trailing_bits_are_refused(rsa_key: SigningKey, keyset: KeySet) -> None:
    head, payload, sig = rsa_key.sign(claims()).split(".")
    assert len(sig) % 4 != 0  # 256-byte signature: 342 chars, 2 unused bits in the last char
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    tweaked = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]
    assert rejected(f"{head}.{payload}.{tweaked}", keyset) == "malformed_token"


def test_invalid_utf8_in_payload_is_refused(rsa_key: SigningKey, keyset: KeySet) -> None:
    h = b64url(b'{"alg":"RS256","kid":"rsa-1"}')
    p = b64url(b'{"sub":"\xff\xfe"}')
    token = f"{h}.{p}.{b64url(rsa_key.raw_sign(f'{h}.{p}'.encode()))}"
    assert rejected(token, keyset) == "malformed_token"


def test_cve_2022_39227_json_serialization_mixup_is_refused(rsa_key: SigningKey, keyset: KeySet) -> None:
    good = rsa_key.sign(claims())
    head, payload, sig = good.split(".")
    forged = json.dumps(
        {f"{head}.{b64url(b'{}')}.": "", "protected": head, "payload": payload, "signature": sig}
    )
    assert rejected(forged, keyset) == "malformed_token"


def test_weak_rsa_keys_in_a_jwks_are_skipped() -> None:
    weak = SigningKey.generate("RS256", kid="weak", rsa_bits=1024)
    strong = SigningKey.generate("ES256", kid="strong")
    parsed = parse_jwks(jwks_document(weak, strong), source="t")
    assert any("fewer than 2048" in s for s in parsed.skipped)
    assert rejected(weak.sign(claims()), parsed.keys) == "unknown_kid"


def test_encryption_only_keys_in_a_jwks_are_skipped(es_key: SigningKey) -> None:
    enc = dataclasses.replace(es_key, extra_jwk={"use": "enc"})
    ops = dataclasses.replace(SigningKey.generate("ES256", kid="ops"), extra_jwk={"key_ops": ["encrypt"]})
    other = SigningKey.generate("EdDSA", kid="ed")
    keys = parse_jwks(jwks_document(enc, ops, other), source="t").keys
    assert rejected(es_key.sign(claims()), keys) == "unknown_kid"
    assert rejected(ops.sign(claims()), keys) == "unknown_kid"


_B64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ .", max_size=60)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(token=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_strings_only_ever_raise_credential_error(token: str, keyset: KeySet) -> None:
    with pytest.raises(CredentialError):
        verify(token, keyset, now=NOW, rule=RULE, settings=SETTINGS)


@settings(max_examples=200, deadline=None)
@given(a=_B64, b=_B64, c=_B64)
def test_arbitrary_three_part_tokens_only_ever_raise_credential_error(
    a: str, b: str, c: str, keyset: KeySet
) -> None:
    with pytest.raises(CredentialError):
        verify(f"{a}.{b}.{c}", keyset, now=NOW, rule=RULE, settings=SETTINGS)


@settings(max_examples=200, deadline=None)
@given(header=_JSON, payload=_JSON, sig=st.binary(max_size=80))
def test_arbitrary_json_parts_only_ever_raise_credential_error(
    header: object, payload: object, sig: bytes, keyset: KeySet
) -> None:
    token = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}.{b64url(sig)}"
    with pytest.raises(CredentialError):
        verify(token, keyset, now=NOW, rule=RULE, settings=SETTINGS)

from __future__ import annotations

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import AuthzError
from authz.idp.keys import KeyRing, generate_key, jwk_thumbprint, sign

T0 = 1_700_000_000.0


def test_rfc7638_section_3_1_thumbprint_vector() -> None:
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJE"
            "CPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Q"
            "vzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6"
            "WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(("alg", "kty"), [("RS256", "RSA"), ("ES256", "EC"), ("EdDSA", "OKP")])
def test_generated_keys_sign_tokens_their_public_jwk_verifies(alg: str, kty: str) -> None:
    key = generate_key(alg)
    jwk = key.jwk()
    assert jwk["kty"] == kty and jwk["kid"] == key.kid == jwk_thumbprint(jwk) and jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk), "private members must never be published"
    token = sign(key, {"sub": "x"}, typ="at+jwt")
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": key.kid, "typ": "at+jwt"}
    public = jwt.PyJWK(jwk).key
    assert jwt.decode(token, public, algorithms=[alg]) == {"sub": "x"}


def test_unsupported_alg_is_refused() -> None:
    with pytest.raises(AuthzError) as info:
        generate_key("HS256")
    assert info.value.reason == "unsupported_alg"


def _ring() -> tuple[KeyRing, str]:
    ring = KeyRing()
    first = ring.add(generate_key("ES256", now=T0))
    first.active_from = T0
    return ring, first.kid


def _kids(ring: KeyRing, now: float) -> list[str]:
    return [k["kid"] for k in ring.jwks(now)["keys"]]


def test_three_phases_one_call_at_a_time() -> None:
    ring, old = _ring()
    new = ring.publish("ES256", T0 + 10).kid
    # phase 1: published, old still signs
    assert _kids(ring, T0 + 10) == [old, new]
    assert ring.signer("ES256", T0 + 10).kid == old  # type: ignore[union-attr]
    assert ring.state(ring.get(new), T0 + 10) == "pending"
    # phase 2: new signs, old still published
    ring.activate(T0 + 20)
    assert ring.signer("ES256", T0 + 20).kid == new  # type: ignore[union-attr]
    assert ring.state(ring.get(old), T0 + 20) == "retiring"
    assert _kids(ring, T0 + 20) == [old, new]
    # phase 3: old leaves the JWKS
    assert [k.kid for k in ring.retire(T0 + 30)] == [old]
    assert _kids(ring, T0 + 30) == [new]
    assert ring.state(ring.get(old), T0 + 30) == "retired"


def test_rotate_schedules_all_phases_on_the_clock() -> None:
    ring, old = _ring()
    new = ring.rotate("ES256", T0 + 100, overlap=30, retire_after=60).kid
    assert ring.signer("ES256", T0 + 129).kid == old  # type: ignore[union-attr]
    assert _kids(ring, T0 + 100) == [old, new]
    assert ring.signer("ES256", T0 + 130).kid == new  # type: ignore[union-attr]
    assert _kids(ring, T0 + 189) == [old, new]
    assert _kids(ring, T0 + 190) == [new]


def test_rotation_of_one_alg_leaves_other_algs_alone() -> None:
    ring, es = _ring()
    rs = ring.add(generate_key("RS256", now=T0))
    rs.active_from = T0
    ring.rotate("ES256", T0, overlap=0, retire_after=0)
    assert ring.signer("RS256", T0 + 1) is rs
    assert es not in _kids(ring, T0 + 1)


def test_activate_without_pending_key_and_unknown_kid_fail() -> None:
    ring, _ = _ring()
    with pytest.raises(AuthzError) as info:
        ring.activate(T0)
    assert info.value.reason == "no_pending_key"
    with pytest.raises(AuthzError) as info:
        ring.get("nope")
    assert info.value.reason == "unknown_kid"


def test_a_retired_key_cannot_be_reactivated_and_kids_are_unique() -> None:
    ring, old = _ring()
    ring.rotate("ES256", T0, overlap=0, retire_after=0)
    with pytest.raises(AuthzError, match="retired"):
        ring.activate(T0 + 1, kid=old)
    with pytest.raises(AuthzError) as info:
        ring.publish("ES256", T0, kid=old)
    assert info.value.reason == "duplicate_kid"


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["publish", "activate", "retire", "rotate", "tick"]),
        st.floats(min_value=0, max_value=50, allow_nan=False),
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None)
@given(_OPS)
def test_signer_is_always_published(ops: list[tuple[str, float]]) -> None:
    """Whatever the admin does, the key that signs is always in the JWKS (consumers can verify)."""
    ring, _ = _ring()
    now = T0
    for op, amount in ops:
        try:
            if op == "publish":
                ring.publish("ES256", now)
            elif op == "activate":
                ring.activate(now)
            elif op == "retire":
                ring.retire(now)
            elif op == "rotate":
                ring.rotate("ES256", now, overlap=amount, retire_after=amount)
            else:
                now += amount
        except AuthzError:
            pass
        signer = ring.signer("ES256", now)
        if signer is not None:
            assert signer.kid in _kids(ring, now)
            assert ring.state(signer, now) == "active"
        assert sum(ring.state(k, now) == "active" for k in ring.keys) <= 1

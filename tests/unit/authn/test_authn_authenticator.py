"""Authenticator: the decision table of spec §3.3, headers, caching, rotation, introspection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from authn_kit import ISSUER, NOW, claims
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.authn import authenticator as authenticator_module
from authz.authn.authenticator import Authenticator, AuthnResult
from authz.authn.jwk import hmac_key
from authz.authn.model import ClaimToHeader, JwtHeader, JwtRule
from authz.authn.settings import AuthnSettings, IntrospectionSettings, IssuerSettings, JwksSettings, SecretRef
from authz.authn.testing import SigningKey, jwks_document
from authz.clock import FrozenClock
from authz.metrics import TOKEN_CACHE
from authz.request import HttpAttributes, Request

OTHER = "https://other.test"


def inline_rule(key: SigningKey, issuer: str = ISSUER, **kw: Any) -> JwtRule:
    return JwtRule(issuer=issuer, jwks=json.dumps(jwks_document(key)), **kw)


def request(path: str = "/", method: str = "GET", **headers: str) -> Request:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    return Request(http=HttpAttributes(method=method, path=path, headers=hdrs))


def bearer(token: str, **headers: str) -> Request:
    return request(authorization=f"Bearer {token}", **headers)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
async def authn(clock: FrozenClock) -> AsyncIterator[Authenticator]:
    a = Authenticator(settings=AuthnSettings(), clock=clock)
    yield a
    await a.close()


async def test_no_token_passes_without_identity(authn: Authenticator, rsa_key: SigningKey) -> None:
    result = await authn.authenticate(request(), [inline_rule(rsa_key)])
    assert result == AuthnResult()
    assert result.ok and result.auth is None


async def test_no_rules_or_tcp_means_nothing_to_do(authn: Authenticator, rsa_key: SigningKey) -> None:
    assert await authn.authenticate(bearer("garbage"), []) == AuthnResult()
    assert await authn.authenticate(Request(), [inline_rule(rsa_key)]) == AuthnResult()


async def test_valid_token_gives_identity_and_strips_the_token_header(
    authn: Authenticator, rsa_key: SigningKey
) -> None:
    result = await authn.authenticate(bearer(rsa_key.sign(claims())), [inline_rule(rsa_key)])
    assert result.ok
    assert result.auth is not None and result.auth.principal == f"{ISSUER}/alice"
    assert result.headers.remove == ("authorization",)
    assert [t.kid for t in result.tokens] == ["rsa-1"]


async def test_forward_original_token_keeps_the_header(authn: Authenticator, rsa_key: SigningKey) -> None:
    rule = inline_rule(rsa_key, forward_original_token=True)
    result = await authn.authenticate(bearer(rsa_key.sign(claims())), [rule])
    assert result.ok and result.headers.remove == ()


async def test_token_in_a_query_param_is_not_removed(authn: Authenticator, rsa_key: SigningKey) -> None:
    result = await authn.authenticate(
        request(f"/?access_token={rsa_key.sign(claims())}"), [inline_rule(rsa_key)]
    )
    assert result.ok and result.auth is not None and result.headers.remove == ()


@pytest.mark.parametrize(
    ("payload", "reason", "status"),
    [
        (claims(exp=NOW - 3600), "expired", 401),
        (claims(nbf=NOW + 3600), "not_yet_valid", 401),
        (claims(iss=OTHER), "issuer_not_configured", 401),
        (claims(aud="elsewhere"), "audience_not_allowed", 403),
    ],
)
async def test_invalid_tokens_are_denied_with_reason_and_status(
    authn: Authenticator, rsa_key: SigningKey, payload: dict[str, Any], reason: str, status: int
) -> None:
    rule = inline_rule(rsa_key, audiences=("api",))
    result = await authn.authenticate(bearer(rsa_key.sign({"aud": "api", **payload})), [rule])
    assert result.error is not None
    assert (result.error.reason, result.error.status) == (reason, status)
    assert result.auth is None


async def test_garbage_token_is_401_not_missing(authn: Authenticator, rsa_key: SigningKey) -> None:
    result = await authn.authenticate(bearer("not-a-jwt"), [inline_rule(rsa_key)])
    assert result.error is not None and result.error.reason == "malformed_token"


async def test_token_in_an_unconfigured_location_is_treated_as_missing(
    authn: Authenticator, rsa_key: SigningKey
) -> None:
    token = rsa_key.sign(claims(exp=NOW - 3600))  # even an invalid one
    rule = inline_rule(rsa_key, from_headers=(JwtHeader("x-jwt"),))
    for req in (bearer(token), request(f"/?token_value={token}"), request(x_jwt_other=token)):
        assert await authn.authenticate(req, [rule]) == AuthnResult()


async def test_rules_with_the_same_issuer_are_alternatives(authn: Authenticator, rsa_key: SigningKey) -> None:
    strict = inline_rule(rsa_key, audiences=("api",))
    lenient = inline_rule(rsa_key)
    result = await authn.authenticate(bearer(rsa_key.sign(claims(aud="other"))), [strict, lenient])
    assert result.ok and result.auth is not None


async def test_audience_403_is_reported_when_no_alternative_accepts(
    authn: Authenticator, rsa_key: SigningKey
) -> None:
    other_key = SigningKey.generate("ES256", kid="rsa-1")
    wrong_keys = inline_rule(other_key)  # same issuer, keys that cannot verify: 401
    strict = inline_rule(rsa_key, audiences=("api",))
    result = await authn.authenticate(bearer(rsa_key.sign(claims(aud="other"))), [wrong_keys, strict])
    assert result.error is not None and result.error.status == 403


async def test_every_present_token_must_be_valid(
    authn: Authenticator, rsa_key: SigningKey, es_key: SigningKey
) -> None:
    a = inline_rule(rsa_key, from_headers=(JwtHeader("x-a"),))
    b = inline_rule(es_key, issuer=OTHER, from_headers=(JwtHeader("x-b"),))
    good_a, good_b = rsa_key.sign(claims()), es_key.sign(claims(iss=OTHER, sub="bob"))
    ok = await authn.authenticate(request(x_a=good_a, x_b=good_b), [a, b])
    assert ok.ok and len(ok.tokens) == 2
    assert ok.auth is not None and ok.auth.subject == "alice"
    expired_b = es_key.sign(claims(iss=OTHER, exp=NOW - 3600))
    bad = await authn.authenticate(request(x_a=good_a, x_b=expired_b), [a, b])
    assert bad.error is not None and bad.error.reason == "expired"


async def test_token_of_an_issuer_configured_only_elsewhere_is_not_configured_here(
    authn: Authenticator, rsa_key: SigningKey, es_key: SigningKey
) -> None:
    a = inline_rule(rsa_key, from_headers=(JwtHeader("x-a"),))
    b = inline_rule(es_key, issuer=OTHER, from_headers=(JwtHeader("x-b"),))
    result = await authn.authenticate(request(x_a=es_key.sign(claims(iss=OTHER))), [a, b])
    assert result.error is not None and result.error.reason == "issuer_not_configured"


async def test_cors_preflight_bypasses_verification(authn: Authenticator, rsa_key: SigningKey) -> None:
    expired = rsa_key.sign(claims(exp=NOW - 3600))
    preflight = request(
        method="OPTIONS",
        authorization=f"Bearer {expired}",
        origin="https://a",
        access_control_request_method="GET",
    )
    result = await authn.authenticate(preflight, [inline_rule(rsa_key)])
    assert result.ok and result.bypassed
    no_origin = request(
        method="OPTIONS", authorization=f"Bearer {expired}", access_control_request_method="GET"
    )
    assert (await authn.authenticate(no_origin, [inline_rule(rsa_key)])).error is not None


async def test_payload_and_claim_headers_are_set_and_client_copies_removed(
    authn: Authenticator, rsa_key: SigningKey
) -> None:
    rule = inline_rule(
        rsa_key,
        output_payload_to_header="x-payload",
        output_claim_to_headers=(
            ClaimToHeader("x-nested", "nested.key"),
            ClaimToHeader("x-iat", "iat"),
            ClaimToHeader("x-evil", "evil"),
            ClaimToHeader("x-missing", "missing"),
        ),
    )
    token = rsa_key.sign(claims(nested={"key": "v"}, evil="a\r\nx-admin: true"))
    result = await authn.authenticate(bearer(token, x_payload="forged", x_missing="forged"), [rule])
    assert dict(result.headers.set) == {
        "x-payload": token.split(".")[1],
        "x-nested": "v",
        "x-iat": str(int(NOW - 10)),
    }
    assert set(result.headers.remove) == {"authorization", "x-evil", "x-missing"}
    anonymous = await authn.authenticate(request(x_payload="forged"), [rule])
    assert anonymous.auth is None and "x-payload" in anonymous.headers.remove


async def test_space_delimited_claims_reach_request_auth(authn: Authenticator, rsa_key: SigningKey) -> None:
    rule = inline_rule(rsa_key, space_delimited_claims=("custom_scope",))
    result = await authn.authenticate(bearer(rsa_key.sign(claims(custom_scope="a b"))), [rule])
    assert result.auth is not None
    assert result.auth.space_delimited == {"scope", "permission", "custom_scope"}


async def test_rule_without_issuer_accepts_tokens_of_any_issuer(
    authn: Authenticator, rsa_key: SigningKey
) -> None:
    rule = JwtRule(jwks=json.dumps(jwks_document(rsa_key)))
    result = await authn.authenticate(bearer(rsa_key.sign(claims(iss="https://anyone.test"))), [rule])
    assert result.ok and result.auth is not None and result.auth.issuer == "https://anyone.test"


async def test_legacy_hmac_issuer_uses_settings_secrets(clock: FrozenClock) -> None:
    key = SigningKey.generate("HS256", kid="legacy")
    settings = AuthnSettings(
        {
            ISSUER: IssuerSettings(
                issuer=ISSUER, hmac_keys=(hmac_key(key.private, kid="legacy", algorithm="HS256"),)
            )
        }
    )
    a = Authenticator(settings=settings, clock=clock)
    rule = JwtRule(issuer=ISSUER, jwks_uri="https://unused.invalid/jwks")
    result = await a.authenticate(bearer(key.sign(claims())), [rule])
    assert result.ok and result.tokens[0].algorithm == "HS256"
    a.update_settings(AuthnSettings())  # secret rotated away: the cached result must not survive
    assert (await a.authenticate(bearer(key.sign(claims())), [rule])).error is not None
    await a.close()


def hits() -> float:
    return TOKEN_CACHE.labels(result="hit").value


async def test_cached_tokens_skip_verification_and_never_suspend(
    authn: Authenticator, rsa_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = inline_rule(rsa_key)
    req = bearer(rsa_key.sign(claims()))
    first = await authn.authenticate(req, [rule])
    calls: list[str] = []
    real_verify = authenticator_module.verify

    def counting_verify(*args: Any, **kwargs: Any) -> Any:
        calls.append("verify")
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(authenticator_module, "verify", counting_verify)
    before = hits()
    coro = authn.authenticate(req, [rule])
    with pytest.raises(StopIteration) as done:
        coro.send(None)  # completes without ever yielding to the event loop
    assert calls == []
    assert hits() == before + 1
    assert done.value.value.auth == first.auth


async def test_cached_results_are_shared_per_token_and_location(
    authn: Authenticator, rsa_key: SigningKey
) -> None:
    rules = (inline_rule(rsa_key),)
    token = rsa_key.sign(claims())
    in_header, in_param = bearer(token), request(f"/?access_token={token}")
    for _ in range(2):  # the second round is answered from the memo: same answers
        from_header = await authn.authenticate(in_header, rules)
        from_param = await authn.authenticate(in_param, rules)
        assert from_header.headers.remove == ("authorization",)  # the token header is stripped...
        assert from_param.headers.remove == ()  # ...a query parameter is not
        assert from_header.auth == from_param.auth and from_header.auth is not None
    assert await authn.authenticate(in_header, rules) is from_header


async def test_new_settings_drop_cached_results(
    authn: Authenticator, rsa_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = (inline_rule(rsa_key),)
    req = bearer(rsa_key.sign(claims()))
    first = await authn.authenticate(req, rules)
    calls: list[str] = []
    real_verify = authenticator_module.verify

    def counting_verify(*args: Any, **kwargs: Any) -> Any:
        calls.append("verify")
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(authenticator_module, "verify", counting_verify)
    authn.update_settings(AuthnSettings())
    again = await authn.authenticate(req, rules)
    assert calls == ["verify"] and again is not first and again.auth == first.auth


async def test_remembered_header_values_still_expire_count_and_see_query_tokens(
    authn: Authenticator, rsa_key: SigningKey, clock: FrozenClock
) -> None:
    rules = (inline_rule(rsa_key),)
    req = bearer(rsa_key.sign(claims(exp=NOW + 10)))
    for _ in range(3):  # verified, then cached, then answered from the header value it was seen with
        assert (await authn.authenticate(req, rules)).ok
    before = hits()
    assert (await authn.authenticate(req, rules)).ok
    assert hits() == before + 1  # still a token cache hit
    # Another token in the query: both are checked, whatever the header value says.
    assert req.http is not None
    with_query = Request(http=HttpAttributes(path="/?access_token=garbage", headers=req.http.headers))
    assert not (await authn.authenticate(with_query, rules)).ok
    clock.advance(10 + 61)
    result = await authn.authenticate(req, rules)
    assert result.error is not None and result.error.reason == "expired"


async def test_cached_token_fast_path_costs_microseconds(authn: Authenticator, rsa_key: SigningKey) -> None:
    rule = inline_rule(rsa_key)
    rules = (rule,)
    req = bearer(rsa_key.sign(claims()))
    await authn.authenticate(req, rules)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        coro = authn.authenticate(req, rules)
        with contextlib.suppress(StopIteration):
            coro.send(None)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 100e-6, f"{per_call * 1e6:.1f} µs per cached authenticate"


async def test_cached_token_expires_with_the_token(
    authn: Authenticator, rsa_key: SigningKey, clock: FrozenClock
) -> None:
    rule = inline_rule(rsa_key)
    req = bearer(rsa_key.sign(claims(exp=NOW + 10)))
    assert (await authn.authenticate(req, [rule])).ok
    clock.advance(10 + 61)
    result = await authn.authenticate(req, [rule])
    assert result.error is not None and result.error.reason == "expired"


class RotatingIdp:
    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self.up = True
        self.urls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        self.urls.append(str(request.url))
        if not self.up:
            return httpx.Response(503)
        return httpx.Response(200, json=jwks_document(*self.keys), headers={"cache-control": "max-age=300"})


@pytest.fixture
async def remote(clock: FrozenClock) -> AsyncIterator[Callable[..., tuple[Authenticator, RotatingIdp]]]:
    made: list[tuple[Authenticator, httpx.AsyncClient]] = []

    def build(*keys: SigningKey, **issuer: Any) -> tuple[Authenticator, RotatingIdp]:
        idp = RotatingIdp(*keys)
        client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
        jwks = JwksSettings(unknown_kid_cooldown=15, max_staleness=600)
        settings = AuthnSettings({ISSUER: IssuerSettings(issuer=ISSUER, jwks=jwks, **issuer)})
        a = Authenticator(settings=settings, clock=clock, http=client)
        made.append((a, client))
        return a, idp

    yield build
    for a, c in made:
        await a.close()
        await c.aclose()


REMOTE_RULE = JwtRule(issuer=ISSUER, jwks_uri=f"{ISSUER}/jwks")


async def test_rotation_removing_a_key_revokes_its_cached_tokens(
    remote: Callable[..., tuple[Authenticator, RotatingIdp]], clock: FrozenClock
) -> None:
    old, new = SigningKey.generate("ES256", kid="old"), SigningKey.generate("ES256", kid="new")
    a, idp = remote(old, new)
    req = bearer(old.sign(claims(exp=NOW + 3600)))
    assert (await a.authenticate(req, [REMOTE_RULE])).ok
    idp.keys = [new]
    clock.advance(400)  # past max-age: the next use refreshes in the background
    assert (await a.authenticate(bearer(new.sign(claims(exp=NOW + 3600))), [REMOTE_RULE])).ok
    await asyncio.sleep(0.01)
    assert idp.fetches == 2
    result = await a.authenticate(req, [REMOTE_RULE])
    assert result.error is not None and result.error.reason == "unknown_kid"


async def test_rotation_revokes_tokens_remembered_by_header_value(
    remote: Callable[..., tuple[Authenticator, RotatingIdp]], clock: FrozenClock
) -> None:
    old, new = SigningKey.generate("ES256", kid="old"), SigningKey.generate("ES256", kid="new")
    a, idp = remote(old, new)
    req = bearer(old.sign(claims(exp=NOW + 3600)))
    for _ in range(3):
        assert (await a.authenticate(req, [REMOTE_RULE])).ok
    idp.keys = [new]
    clock.advance(400)
    assert (await a.authenticate(bearer(new.sign(claims(exp=NOW + 3600))), [REMOTE_RULE])).ok
    await asyncio.sleep(0.01)
    result = await a.authenticate(req, [REMOTE_RULE])
    assert result.error is not None and result.error.reason == "unknown_kid"


async def test_token_signed_by_a_new_key_triggers_one_refetch(
    remote: Callable[..., tuple[Authenticator, RotatingIdp]], clock: FrozenClock
) -> None:
    old, new = SigningKey.generate("ES256", kid="old"), SigningKey.generate("ES256", kid="new")
    a, idp = remote(old)
    assert (await a.authenticate(bearer(old.sign(claims())), [REMOTE_RULE])).ok
    idp.keys = [old, new]
    clock.advance(20)
    assert (await a.authenticate(bearer(new.sign(claims())), [REMOTE_RULE])).ok
    assert idp.fetches == 2


async def test_unavailable_keys_deny_tokens_but_not_anonymous_requests(
    remote: Callable[..., tuple[Authenticator, RotatingIdp]],
) -> None:
    key = SigningKey.generate("ES256", kid="k")
    a, idp = remote(key)
    idp.up = False
    result = await a.authenticate(bearer(key.sign(claims())), [REMOTE_RULE])
    assert (
        result.error is not None
        and result.error.reason == "issuer_unavailable"
        and result.error.status == 401
    )
    assert (await a.authenticate(request(), [REMOTE_RULE])).ok
    described = a.describe()["key_sources"]
    assert isinstance(described, list) and described[0]["state"] == "failing"


class IntrospectionServer:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
        if form["token"] == "active-token":
            return httpx.Response(
                200, json={"active": True, "sub": "svc", "scope": "read write", "exp": NOW + 600}
            )
        return httpx.Response(200, json={"active": False})


async def test_opaque_tokens_are_introspected_and_cached(clock: FrozenClock) -> None:
    server = IntrospectionServer()
    client = httpx.AsyncClient(transport=httpx.MockTransport(server))
    intro = IntrospectionSettings(
        endpoint=f"{ISSUER}/introspect",
        client_id="mesh",
        client_secret_ref=SecretRef(env="X"),
        client_secret="s3",
    )
    settings = AuthnSettings({ISSUER: IssuerSettings(issuer=ISSUER, introspection=intro)})
    a = Authenticator(settings=settings, clock=clock, http=client)
    rule = JwtRule(issuer=ISSUER, jwks_uri=f"{ISSUER}/jwks")
    for _ in range(2):
        result = await a.authenticate(bearer("active-token"), [rule])
        assert result.ok and result.auth is not None
        assert result.auth.principal == f"{ISSUER}/svc"
    assert len(server.requests) == 1
    assert server.requests[0].headers["authorization"].startswith("Basic ")
    denied = await a.authenticate(bearer("revoked-token"), [rule])
    assert denied.error is not None and denied.error.reason == "inactive_token"
    await a.close()
    await client.aclose()


async def test_opaque_token_without_introspection_is_malformed(
    authn: Authenticator, rsa_key: SigningKey
) -> None:
    result = await authn.authenticate(bearer("opaque-token"), [inline_rule(rsa_key)])
    assert result.error is not None and result.error.reason == "malformed_token"


async def test_describe_lists_sources_and_cache(authn: Authenticator, rsa_key: SigningKey) -> None:
    await authn.authenticate(bearer(rsa_key.sign(claims())), [inline_rule(rsa_key)])
    d = authn.describe()
    assert d["token_cache"] == {"entries": 1, "max_entries": 10_000}
    sources = d["key_sources"]
    assert isinstance(sources, list) and sources[0]["source"] == "inline"


async def test_changed_jwks_settings_rebuild_the_key_source(
    remote: Callable[..., tuple[Authenticator, RotatingIdp]],
) -> None:
    key = SigningKey.generate("ES256", kid="k")
    a, idp = remote(key)
    assert (await a.authenticate(bearer(key.sign(claims())), [REMOTE_RULE])).ok
    a.update_settings(a.settings)  # unchanged: the source (and its keys) stay
    assert (await a.authenticate(bearer(key.sign(claims(sub="b"))), [REMOTE_RULE])).ok
    assert idp.fetches == 1
    changed = IssuerSettings(issuer=ISSUER, jwks=JwksSettings(max_staleness=5))
    a.update_settings(AuthnSettings({ISSUER: changed}))
    assert (await a.authenticate(bearer(key.sign(claims(sub="c"))), [REMOTE_RULE])).ok
    assert idp.fetches == 2


def test_public_api_is_exactly_the_intended_names() -> None:
    import authz.authn as pkg

    assert sorted(pkg.__all__) == sorted(
        [
            "Authenticator",
            "AuthnResult",
            "AuthnSettings",
            "CertificateBinding",
            "ClaimToHeader",
            "IssuerSettings",
            "Jwk",
            "JwtHeader",
            "JwtRule",
            "KeySet",
            "RequestAuthentication",
            "SpiffeBinding",
            "VerifiedToken",
            "claim_headers",
            "jwt_rules_for",
            "load_issuer_settings",
            "load_request_authentications",
            "parse_jwks",
            "resolve_secrets",
            "verify",
        ]
    )
    assert all(hasattr(pkg, name) for name in pkg.__all__)


async def test_urls_named_by_a_token_are_never_fetched(
    remote: Callable[..., tuple[Authenticator, RotatingIdp]], clock: FrozenClock
) -> None:
    key = SigningKey.generate("ES256", kid="k")
    attacker = SigningKey.generate("ES256", kid="evil")
    a, idp = remote(key)
    header = {"jku": "https://attacker.test/jwks", "x5u": "https://attacker.test/cert"}
    for i in range(3):
        clock.advance(20)  # past the unknown-kid cooldown each time
        token = attacker.sign(claims(iss=ISSUER, sub=f"s{i}"), header=header)
        result = await a.authenticate(bearer(token), [REMOTE_RULE])
        assert result.error is not None and result.error.reason == "unknown_kid"
    assert idp.urls and set(idp.urls) == {f"{ISSUER}/jwks"}


@settings(max_examples=150, deadline=None)
@given(
    auth=st.text(max_size=120),
    query=st.text(max_size=60),
    cookie=st.text(max_size=60),
)
def test_arbitrary_credentials_never_raise(auth: str, query: str, cookie: str, rsa_key: SigningKey) -> None:
    rules = [
        inline_rule(rsa_key, audiences=("api",)),
        inline_rule(rsa_key, issuer=OTHER, from_params=("t",), from_cookies=("c",)),
    ]
    req = request(f"/?t={query}&access_token={query}", authorization=auth, cookie=f"c={cookie}")
    prefixed = request(authorization=f"Bearer {auth}")

    async def run() -> list[AuthnResult]:
        a = Authenticator(settings=AuthnSettings(), clock=FrozenClock(NOW))
        try:
            return [await a.authenticate(r, rules) for r in (req, prefixed)]
        finally:
            await a.close()

    for result in asyncio.run(run()):
        assert isinstance(result, AuthnResult)
        assert result.error is None or result.error.status in (401, 403)


# -- authenticate_now: the same answers, without waiting -------------------------------------------------


async def test_authenticate_now_answers_once_the_token_is_verified(
    authn: Authenticator, clock: FrozenClock, rsa_key: SigningKey
) -> None:
    rule = inline_rule(rsa_key)
    rules = (rule,)
    token = rsa_key.sign(claims(exp=NOW + 120))
    assert authn.authenticate_now(request(), rules) == await authn.authenticate(request(), rules)  # no token
    assert authn.authenticate_now(Request(), rules) is not None
    assert authn.authenticate_now(bearer(token), rules) is None  # the signature must be checked first
    assert authn.authenticate_now(bearer("garbage"), rules) is None  # failures are not cached
    waited = await authn.authenticate(bearer(token), rules)
    assert waited.ok
    now = authn.authenticate_now(bearer(token), rules)
    assert now == waited
    assert authn.authenticate_now(bearer(token), rules) is now  # one shared result per token
    assert authn.authenticate_now(bearer(token), [rule]) is now  # a list of rules: same answer
    clock.now = NOW + 3600  # the cache entry ends with the token (and skew): verify, and fail, again
    assert authn.authenticate_now(bearer(token), rules) is None
    assert (await authn.authenticate(bearer(token), rules)).error is not None


async def test_authenticate_now_is_none_until_every_token_is_verified(
    authn: Authenticator, rsa_key: SigningKey, es_key: SigningKey
) -> None:
    rules = (
        inline_rule(rsa_key, from_headers=(JwtHeader("x-a"),)),
        inline_rule(es_key, issuer=OTHER, from_headers=(JwtHeader("x-b"),)),
    )
    good_a, good_b = rsa_key.sign(claims()), es_key.sign(claims(iss=OTHER, sub="bob"))
    await authn.authenticate(request(x_a=good_a), rules)  # only the first is verified
    assert authn.authenticate_now(request(x_a=good_a), rules) is not None
    assert authn.authenticate_now(request(x_a=good_a, x_b=good_b), rules) is None
    waited = await authn.authenticate(request(x_a=good_a, x_b=good_b), rules)
    assert waited.ok and len(waited.tokens) == 2
    now = authn.authenticate_now(request(x_a=good_a, x_b=good_b), rules)
    assert now == waited
    # the second token is checked as well even when the first is cached: a bad one is never skipped
    assert authn.authenticate_now(request(x_a=good_a, x_b="garbage"), rules) is None
    bad = await authn.authenticate(request(x_a=good_a, x_b="garbage"), rules)
    assert bad.error is not None


async def test_a_token_verified_for_the_first_time_is_one_cache_miss(
    authn: Authenticator, rsa_key: SigningKey
) -> None:
    miss = TOKEN_CACHE.labels(result="miss")
    before = miss.value
    await authn.authenticate(bearer(rsa_key.sign(claims())), (inline_rule(rsa_key),))
    assert miss.value == before + 1

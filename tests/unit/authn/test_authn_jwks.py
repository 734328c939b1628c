"""RemoteKeySource with a mock transport and a frozen clock: caching, staleness, backoff, single-flight."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import httpx
import pytest

from authz.authn.jwk import parse_jwks
from authz.authn.jwks import RemoteKeySource, StaticKeySource, cache_lifetime
from authz.authn.settings import JwksSettings
from authz.authn.testing import SigningKey, jwks_document
from authz.clock import FrozenClock
from authz.errors import DependencyError
from authz.metrics import JWKS_FETCHES

ISSUER = "https://idp.test"
BOUNDS = JwksSettings(
    min_cache_duration=30,
    max_cache_duration=3600,
    default_cache_duration=300,
    refresh_before_expiry=30,
    unknown_kid_cooldown=15,
    max_staleness=600,
)


class FakeIdp:
    """Serves discovery and a JWKS through httpx.MockTransport; counts requests per path."""

    def __init__(self, *keys: SigningKey) -> None:
        self.doc: object = jwks_document(*keys)
        self.cache_control: str | None = "max-age=120"
        self.status = 200
        self.hits: dict[str, int] = {}
        self.delay = 0.0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.hits[request.url.path] = self.hits.get(request.url.path, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return httpx.Response(self.status)
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/keys"})
        headers = {"cache-control": self.cache_control} if self.cache_control else {}
        return httpx.Response(200, content=json.dumps(self.doc).encode(), headers=headers)

    @property
    def jwks_hits(self) -> int:
        return self.hits.get("/keys", 0)


@pytest.fixture(scope="module")
def key1() -> SigningKey:
    return SigningKey.generate("ES256", kid="one")


@pytest.fixture(scope="module")
def key2() -> SigningKey:
    return SigningKey.generate("ES256", kid="two")


Factory = Callable[..., Awaitable[tuple[RemoteKeySource, FakeIdp, FrozenClock]]]


@pytest.fixture
async def make() -> Callable[..., Awaitable[tuple[RemoteKeySource, FakeIdp, FrozenClock]]]:
    clients: list[httpx.AsyncClient] = []

    async def build(
        *keys: SigningKey, uri: str = f"{ISSUER}/keys", timeout: float = 5.0
    ) -> tuple[RemoteKeySource, FakeIdp, FrozenClock]:
        idp = FakeIdp(*keys)
        clock = FrozenClock(1000.0)
        client = httpx.AsyncClient(transport=httpx.MockTransport(idp))
        clients.append(client)
        source = RemoteKeySource(
            issuer=ISSUER, jwks_uri=uri, settings=BOUNDS, timeout=timeout, clock=clock, http=client
        )
        return source, idp, clock

    yield build
    for c in clients:
        await c.aclose()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 300),
        ("max-age=120", 120),
        ("public, max-age=5", 30),
        ("max-age=999999", 3600),
        ('max-age="60"', 60),
        ("no-store", 30),
        ("no-cache, max-age=600", 30),
        ("private", 300),
    ],
)
def test_cache_lifetime_honours_max_age_within_bounds(header: str | None, seconds: float) -> None:
    assert cache_lifetime(header, BOUNDS) == seconds


async def test_keys_are_fetched_once_and_cached(make: Factory, key1: SigningKey) -> None:
    source, idp, clock = await make(key1)
    assert source.current() is None
    keys = await source.get()
    assert keys.has_kid("one")
    clock.advance(60)
    assert await source.get() is keys
    assert idp.jwks_hits == 1
    d = source.describe()
    assert d["state"] == "fresh" and d["kids"] == ["one"] and d["last_fetch"] == 1000.0


async def test_refresh_happens_in_the_background_before_expiry(make: Factory, key1: SigningKey) -> None:
    source, idp, clock = await make(key1)
    old = await source.get()
    clock.advance(91)  # max-age 120 - refreshBeforeExpiry 30
    assert source.current() is old  # served at once, refresh scheduled
    await asyncio.sleep(0.01)
    assert idp.jwks_hits == 2
    assert source.current() is not old


async def test_failed_refresh_keeps_serving_stale_keys_up_to_the_bound(
    make: Factory, key1: SigningKey
) -> None:
    source, idp, clock = await make(key1)
    keys = await source.get()
    idp.status = 503
    clock.advance(200)  # expired (120 s) but within max_staleness (600 s)
    assert source.current() is keys
    await source.refresh()
    assert source.describe()["state"] == "stale"
    assert "HTTP 503" in str(source.describe()["last_error"])
    clock.advance(600)
    assert source.current() is None
    with pytest.raises(DependencyError) as info:
        await source.get()
    assert info.value.reason == "issuer_unavailable"
    assert ISSUER in info.value.message


async def test_failures_back_off_and_recovery_is_automatic(make: Factory, key1: SigningKey) -> None:
    source, idp, clock = await make(key1)
    idp.status = 503
    with pytest.raises(DependencyError):
        await source.get()
    with pytest.raises(DependencyError):
        await source.get()  # within backoff: fails fast, no request
    assert idp.jwks_hits == 1
    clock.advance(1.0)
    with pytest.raises(DependencyError):
        await source.get()
    assert idp.jwks_hits == 2
    clock.advance(1.5)  # second backoff is 2 s
    with pytest.raises(DependencyError):
        await source.get()
    assert idp.jwks_hits == 2
    idp.status = 200
    clock.advance(1.0)
    assert (await source.get()).has_kid("one")
    assert source.describe()["consecutive_failures"] == 0


async def test_unknown_kid_refetch_is_rate_limited(make: Factory, key1: SigningKey, key2: SigningKey) -> None:
    source, idp, clock = await make(key1)
    await source.get()
    idp.doc = jwks_document(key1, key2)
    keys = await source.refetch_for_kid("two")  # the first unknown kid refetches at once
    assert keys is not None and keys.has_kid("two")
    assert idp.jwks_hits == 2
    await source.refetch_for_kid("two")  # known now: nothing to do
    for i in range(5):
        await source.refetch_for_kid(f"random-{i}")
    assert idp.jwks_hits == 2  # within 15 s of the last kid-triggered refetch: none
    clock.advance(14)
    await source.refetch_for_kid("random-x")
    assert idp.jwks_hits == 2
    clock.advance(1)
    await source.refetch_for_kid("random-y")
    assert idp.jwks_hits == 3


async def test_concurrent_unknown_kids_share_one_fetch(make: Factory, key1: SigningKey) -> None:
    source, idp, clock = await make(key1)
    await source.get()
    clock.advance(100)
    idp.delay = 0.02
    await asyncio.gather(*(source.refetch_for_kid(f"random-{i}") for i in range(200)))
    assert idp.jwks_hits == 2


async def test_concurrent_first_requests_share_one_fetch(make: Factory, key1: SigningKey) -> None:
    source, idp, _ = await make(key1)
    idp.delay = 0.02
    results = await asyncio.gather(*(source.get() for _ in range(50)))
    assert idp.jwks_hits == 1
    assert all(r is results[0] for r in results)


async def test_discovery_finds_the_jwks_uri(make: Factory, key1: SigningKey) -> None:
    source, idp, _ = await make(key1, uri="")
    assert (await source.get()).has_kid("one")
    assert idp.hits == {"/.well-known/openid-configuration": 1, "/keys": 1}
    assert source.describe()["jwks_uri"] == f"{ISSUER}/keys"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"nokeys": []}, 'has no "keys" array'),
        ({"keys": []}, "the keys array is empty"),
        ({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}, "fewer than 2048"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "never taken from a JWKS"),
        ([1, 2], "is not a JSON object"),
    ],
)
async def test_broken_documents_are_reported_with_issuer_and_cause(
    make: Factory, key1: SigningKey, doc: object, message: str
) -> None:
    source, idp, _ = await make(key1)
    idp.doc = doc
    before = JWKS_FETCHES.labels(issuer=ISSUER, result="error")._value.get()
    with pytest.raises(DependencyError):
        await source.get()
    error = str(source.describe()["last_error"])
    assert ISSUER in error and message in error
    assert JWKS_FETCHES.labels(issuer=ISSUER, result="error")._value.get() == before + 1


async def test_slow_idp_times_out(make: Factory, key1: SigningKey) -> None:
    source, idp, _ = await make(key1, timeout=0.01)
    idp.delay = 1.0
    with pytest.raises(DependencyError):
        await source.get()
    assert "timed out" in str(source.describe()["last_error"])
    await source.close()


async def test_static_source_describes_inline_keys(key1: SigningKey) -> None:
    parsed = parse_jwks(jwks_document(key1), source="inline")
    source = StaticKeySource(issuer=ISSUER, keys=parsed.keys)
    assert (await source.get()) is parsed.keys
    assert source.describe()["state"] == "static"

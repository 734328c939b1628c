"""RFC 7662 introspection client: client authentication, answers, failures, caching."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs

import httpx
import pytest
from authn_kit import NOW

from authz.authn.introspection import Introspector
from authz.authn.settings import IntrospectionSettings, SecretRef
from authz.clock import FrozenClock
from authz.errors import CredentialError, DependencyError

ENDPOINT = "https://idp.test/introspect"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
async def build() -> AsyncIterator[Callable[..., tuple[Introspector, list[httpx.Request], FrozenClock]]]:
    clients: list[httpx.AsyncClient] = []

    def make(
        handler: Handler, method: str = "client_secret_basic"
    ) -> tuple[Introspector, list[httpx.Request], FrozenClock]:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        client = httpx.AsyncClient(transport=httpx.MockTransport(record))
        clients.append(client)
        clock = FrozenClock(NOW)
        s = IntrospectionSettings(
            endpoint=ENDPOINT,
            client_id="mesh authz",
            client_secret_ref=SecretRef(env="X"),
            client_secret="p@ss:word",
            auth_method=method,
            cache_duration=30,
        )
        return (
            Introspector(issuer="https://idp.test", settings=s, clock=clock, http=client, timeout=1),
            seen,
            clock,
        )

    yield make
    for c in clients:
        await c.aclose()


def active(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"active": True, "sub": "svc", "exp": NOW + 10})


async def test_basic_client_authentication_is_form_encoded(
    build: Callable[..., tuple[Introspector, list[httpx.Request], FrozenClock]],
) -> None:
    intro, seen, _ = build(active)
    claims = await intro.introspect("tok")
    assert claims["sub"] == "svc"
    auth = base64.b64decode(seen[0].headers["authorization"].split()[1]).decode()
    assert auth == "mesh%20authz:p%40ss%3Aword"  # RFC 6749 section 2.3.1
    form = parse_qs(seen[0].content.decode())
    assert form == {"token": ["tok"], "token_type_hint": ["access_token"]}


async def test_post_client_authentication_puts_credentials_in_the_body(
    build: Callable[..., tuple[Introspector, list[httpx.Request], FrozenClock]],
) -> None:
    intro, seen, _ = build(active, "client_secret_post")
    await intro.introspect("tok")
    form = parse_qs(seen[0].content.decode())
    assert form["client_id"] == ["mesh authz"] and form["client_secret"] == ["p@ss:word"]
    assert "authorization" not in seen[0].headers


async def test_answers_are_cached_until_exp_or_cache_duration(
    build: Callable[..., tuple[Introspector, list[httpx.Request], FrozenClock]],
) -> None:
    intro, seen, clock = build(active)
    await intro.introspect("tok")
    await intro.introspect("tok")
    assert len(seen) == 1
    clock.advance(10)  # the token's exp
    await intro.introspect("tok")
    assert len(seen) == 2


async def test_inactive_is_a_401_and_cached_briefly(
    build: Callable[..., tuple[Introspector, list[httpx.Request], FrozenClock]],
) -> None:
    intro, seen, clock = build(lambda r: httpx.Response(200, json={"active": False, "sub": "ignored"}))
    for _ in range(2):
        with pytest.raises(CredentialError) as info:
            await intro.introspect("dead")
        assert info.value.reason == "inactive_token" and info.value.status == 401
    assert len(seen) == 1
    clock.advance(11)
    with pytest.raises(CredentialError):
        await intro.introspect("dead")
    assert len(seen) == 2


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500),
        httpx.Response(200, content=b"not json"),
        httpx.Response(200, json={"active": "yes"}),
    ],
)
async def test_server_failures_are_dependency_errors(
    build: Callable[..., tuple[Introspector, list[httpx.Request], FrozenClock]], response: httpx.Response
) -> None:
    intro, _, _ = build(lambda r: response)
    with pytest.raises(DependencyError) as info:
        await intro.introspect("tok")
    assert info.value.reason == "issuer_unavailable"
    assert intro.describe()["last_error"]

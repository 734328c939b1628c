"""The IdP goes down and comes back: stale keys serve within the bound, then fail closed, then recover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from authz.authn.authenticator import Authenticator
from authz.authn.model import JwtRule
from authz.authn.settings import AuthnSettings, IssuerSettings, JwksSettings
from authz.authn.testing import JwksServer, SigningKey, jwks_document
from authz.request import HttpAttributes, Request

pytestmark = pytest.mark.integration


def bearer(token: str) -> Request:
    return Request(http=HttpAttributes(headers={"authorization": f"Bearer {token}"}))


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    s = await JwksServer().start()
    yield s
    await s.stop()


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_idp_down_then_up(server: JwksServer) -> None:
    key = SigningKey.generate("ES256", kid="k")
    server.set_json("/jwks", jwks_document(key), cache_control="max-age=0")
    jwks = JwksSettings(
        min_cache_duration=0.2, default_cache_duration=0.2, refresh_before_expiry=0.05, max_staleness=0.8
    )
    settings = AuthnSettings({server.issuer: IssuerSettings(issuer=server.issuer, jwks=jwks)})
    authn = Authenticator(settings=settings, clock=time.time, backoff_initial=0.05)
    rule = JwtRule(issuer=server.issuer, jwks_uri=server.url("/jwks"))

    def token() -> str:
        now = time.time()
        return key.sign({"iss": server.issuer, "sub": f"u{now}", "exp": now + 60})

    await authn.start()
    try:
        assert (await authn.authenticate(bearer(token()), [rule])).ok
        server.down = True
        # Within max-age + max_staleness (1.0 s) the last good keys keep serving, though refreshes fail.
        for _ in range(6):
            await asyncio.sleep(0.1)
            result = await authn.authenticate(bearer(token()), [rule])
            assert result.ok, result.error
        [source] = authn.describe()["key_sources"]  # type: ignore[misc]
        assert source["state"] == "stale" and "503" in source["last_error"]
        await asyncio.sleep(0.6)
        denied = await authn.authenticate(bearer(token()), [rule])
        assert denied.error is not None and denied.error.reason == "issuer_unavailable"
        assert denied.error.status == 401
        anonymous = await authn.authenticate(Request(http=HttpAttributes()), [rule])
        assert anonymous.ok
        server.down = False

        async def recovered() -> bool:
            return (await authn.authenticate(bearer(token()), [rule])).ok

        deadline = time.monotonic() + 5
        while not await recovered():
            assert time.monotonic() < deadline, "did not recover"
            await asyncio.sleep(0.05)
    finally:
        await authn.close()

"""Key rotation against a real HTTP JWKS server on 127.0.0.1:0: no verification may fail."""

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

FAST = JwksSettings(
    min_cache_duration=0.1,
    max_cache_duration=60,
    default_cache_duration=0.3,
    refresh_before_expiry=0.1,
    unknown_kid_cooldown=0.2,
    max_staleness=60,
)


def bearer(token: str) -> Request:
    return Request(http=HttpAttributes(headers={"authorization": f"Bearer {token}"}))


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    s = await JwksServer().start()
    yield s
    await s.stop()


async def run_clients(
    authn: Authenticator, rule: JwtRule, issuer: str, signer: list[SigningKey], seconds: float
) -> tuple[int, list[str]]:
    """Four concurrent clients, each minting a fresh token with the IdP's current signing key."""
    failures: list[str] = []
    count = 0
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        nonlocal count
        i = 0
        while time.monotonic() < deadline and i < 10_000:
            i += 1
            now = time.time()
            token = signer[0].sign({"iss": issuer, "sub": f"c{n}-{i}", "exp": now + 60, "iat": now})
            result = await authn.authenticate(bearer(token), [rule])
            count += 1
            if result.error is not None:
                failures.append(f"{signer[0].kid}: {result.error.reason}: {result.error.message}")
            await asyncio.sleep(0.005)

    await asyncio.gather(*(client(n) for n in range(4)))
    return count, failures


@pytest.mark.parametrize("overlap", [True, False], ids=["announced-first", "signed-immediately"])
async def test_rotation_causes_zero_failed_verifications(server: JwksServer, overlap: bool) -> None:
    k1, k2, k3 = (SigningKey.generate("ES256", kid=f"k{i}") for i in (1, 2, 3))
    server.set_json("/jwks", jwks_document(k1), cache_control="max-age=0")
    settings = AuthnSettings({server.issuer: IssuerSettings(issuer=server.issuer, jwks=FAST)})
    authn = Authenticator(settings=settings, clock=time.time)
    await authn.start()
    rule = JwtRule(issuer=server.issuer, jwks_uri=server.url("/jwks"))
    signer = [k1]

    async def idp_rotates() -> None:
        for old, new in ((k1, k2), (k2, k3)):
            await asyncio.sleep(0.4)
            if overlap:  # publish the new key first, start signing with it a little later
                server.set_json("/jwks", jwks_document(old, new), cache_control="max-age=0")
                await asyncio.sleep(0.4)
                signer[0] = new
                await asyncio.sleep(0.4)
                server.set_json("/jwks", jwks_document(new), cache_control="max-age=0")
            else:  # swap keys and start signing with the new one at the same instant
                server.set_json("/jwks", jwks_document(new), cache_control="max-age=0")
                signer[0] = new

    try:
        (count, failures), _ = await asyncio.gather(
            run_clients(authn, rule, server.issuer, signer, 3.0 if overlap else 1.5), idp_rotates()
        )
    finally:
        await authn.close()
    assert signer[0] is k3
    assert failures == []
    assert count > 100
    assert server.hits["/jwks"] >= 3  # the rotations were actually fetched

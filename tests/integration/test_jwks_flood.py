"""A flood of tokens with random kids causes a bounded number of JWKS fetches."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest

from authz.authn.authenticator import Authenticator
from authz.authn.model import JwtRule
from authz.authn.settings import AuthnSettings
from authz.authn.testing import JwksServer, SigningKey, jwks_document
from authz.request import HttpAttributes, Request

pytestmark = pytest.mark.integration


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    s = await JwksServer().start()
    yield s
    await s.stop()


async def test_unknown_kid_flood_is_bounded(server: JwksServer) -> None:
    real = SigningKey.generate("ES256", kid="real")
    server.set_json("/jwks", jwks_document(real), cache_control="max-age=300", delay=0.05)
    authn = Authenticator(settings=AuthnSettings(), clock=time.time)
    rule = JwtRule(issuer=server.issuer, jwks_uri=server.url("/jwks"))
    attacker = SigningKey.generate("ES256", kid=None)

    async def forged() -> str | None:
        kid = secrets.token_hex(8)
        token = attacker.sign(
            {"iss": server.issuer, "sub": "x", "exp": time.time() + 60}, header={"kid": kid}
        )
        result = await authn.authenticate(
            Request(http=HttpAttributes(headers={"authorization": f"Bearer {token}"})), [rule]
        )
        return result.error.reason if result.error is not None else None

    try:
        reasons = await asyncio.gather(*(forged() for _ in range(200)))
        again = await asyncio.gather(*(forged() for _ in range(200)))
    finally:
        await authn.close()
    assert set(reasons) == set(again) == {"unknown_kid"}
    assert server.hits["/jwks"] <= 2

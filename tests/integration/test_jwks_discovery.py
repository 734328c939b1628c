"""OIDC discovery against a real server, including an IdP that starts after the authorizer."""

from __future__ import annotations

import asyncio
import time

import pytest

from authz.authn.authenticator import Authenticator
from authz.authn.model import JwtRule
from authz.authn.settings import AuthnSettings
from authz.authn.testing import JwksServer, SigningKey, jwks_document
from authz.request import HttpAttributes, Request
from tests.integration.envoy_harness import free_port

pytestmark = pytest.mark.integration


def bearer(token: str) -> Request:
    return Request(http=HttpAttributes(headers={"authorization": f"Bearer {token}"}))


async def test_discovery_when_the_idp_starts_late() -> None:
    key = SigningKey.generate("EdDSA", kid="ed")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    authn = Authenticator(settings=AuthnSettings(), clock=time.time, backoff_initial=0.05)
    rule = JwtRule(issuer=issuer)  # no jwksUri: discovery
    authn.prepare([rule])
    await authn.start()
    server = JwksServer()
    try:
        token = key.sign({"iss": issuer, "sub": "late", "exp": time.time() + 60})
        early = await authn.authenticate(bearer(token), [rule])
        assert early.error is not None and early.error.reason == "issuer_unavailable"
        assert (await authn.authenticate(Request(http=HttpAttributes()), [rule])).ok

        await server.start(port)
        server.serve_discovery("/keys")
        server.set_json("/keys", jwks_document(key))
        deadline = time.monotonic() + 5
        while True:  # the background task rediscovers on its own; requests keep failing fast meanwhile
            [source] = authn.describe()["key_sources"]  # type: ignore[misc]
            if source["state"] == "fresh":
                break
            assert time.monotonic() < deadline, source
            await asyncio.sleep(0.05)
        assert source["jwks_uri"] == f"{issuer}/keys"
        result = await authn.authenticate(bearer(token), [rule])
        assert result.ok and result.auth is not None and result.auth.principal == f"{issuer}/late"
        assert server.hits["/.well-known/openid-configuration"] == 1
    finally:
        await authn.close()
        await server.stop()


async def test_discovery_with_trailing_slash_issuer() -> None:
    key = SigningKey.generate("ES256", kid="k")
    server = await JwksServer().start()
    try:
        server.serve_discovery("/jwks")
        server.set_json("/jwks", jwks_document(key))
        issuer = server.issuer + "/"
        authn = Authenticator(settings=AuthnSettings(), clock=time.time)
        rule = JwtRule(issuer=issuer)
        result = await authn.authenticate(bearer(key.sign({"iss": issuer, "sub": "s"})), [rule])
        await authn.close()
        assert result.ok
        assert server.hits["/.well-known/openid-configuration"] == 1
    finally:
        await server.stop()


async def test_jwks_slower_than_the_rule_timeout_is_401() -> None:
    key = SigningKey.generate("ES256", kid="k")
    server = await JwksServer().start()
    try:
        server.set_json("/jwks", jwks_document(key), delay=0.5)
        authn = Authenticator(settings=AuthnSettings(), clock=time.time)
        rule = JwtRule(issuer=server.issuer, jwks_uri=server.url("/jwks"), timeout=0.01)
        result = await authn.authenticate(bearer(key.sign({"iss": server.issuer, "sub": "s"})), [rule])
        await authn.close()
        assert result.error is not None and result.error.reason == "issuer_unavailable"
    finally:
        await server.stop()

"""OpenID Connect Discovery 1.0 (section 4): ``<issuer>/.well-known/openid-configuration`` -> ``jwks_uri``.

Only configured issuers are ever discovered; a URL named by a token is never fetched.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import httpx

from authz.errors import DependencyError

__all__ = ["DISCOVERY_PATH", "MAX_DISCOVERY_BYTES", "discover_jwks_uri", "discovery_url", "read_limited"]

DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_DISCOVERY_BYTES = 256 * 1024  # real discovery documents are a few KiB


def discovery_url(issuer: str) -> str:
    """istio ``jwks_resolver.go`` ``resolveJwksURIUsingOpenID``: the issuer without a trailing ``/``
    plus ``/.well-known/openid-configuration`` (OIDC Discovery section 4)."""
    return issuer.rstrip("/") + DISCOVERY_PATH


async def read_limited(client: httpx.AsyncClient, url: str, *, timeout: float, limit: int) -> httpx.Response:
    """GET ``url`` reading at most ``limit`` bytes of body; raises :class:`DependencyError`."""
    try:
        async with client.stream("GET", url, timeout=timeout, headers={"accept": "application/json"}) as resp:
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise DependencyError(
                        f"{url}: response larger than {limit} bytes", reason="issuer_unavailable"
                    )
            if resp.status_code != 200:
                raise DependencyError(f"{url}: HTTP {resp.status_code}", reason="issuer_unavailable")
            return httpx.Response(200, headers=resp.headers, content=bytes(body))
    except httpx.TimeoutException:
        raise DependencyError(f"{url}: timed out after {timeout:g}s", reason="issuer_unavailable") from None
    except httpx.HTTPError as exc:
        raise DependencyError(f"{url}: {type(exc).__name__}: {exc}", reason="issuer_unavailable") from None


async def discover_jwks_uri(client: httpx.AsyncClient, issuer: str, *, timeout: float) -> str:
    """Fetch the issuer's discovery document and return its ``jwks_uri`` (must be http or https)."""
    url = discovery_url(issuer)
    resp = await read_limited(client, url, timeout=timeout, limit=MAX_DISCOVERY_BYTES)
    try:
        doc = json.loads(resp.content)
    except ValueError:
        raise DependencyError(f"{url}: discovery document is not JSON", reason="issuer_unavailable") from None
    uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
    if (
        not isinstance(uri, str)
        or urlsplit(uri).scheme not in ("http", "https")
        or not urlsplit(uri).hostname
    ):
        raise DependencyError(
            f"{url}: no http(s) jwks_uri in discovery document", reason="issuer_unavailable"
        )
    return uri

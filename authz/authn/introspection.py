"""OAuth 2.0 Token Introspection (RFC 7662) for issuers whose access tokens are opaque.

A POST of ``token=...&token_type_hint=access_token`` with client authentication (RFC 6749 section
2.3.1, ``client_secret_basic`` or ``client_secret_post``); the JSON answer's ``active`` decides.
Answers are cached (bounded, never past the token's ``exp`` nor ``cacheDuration``), so revocation
takes effect within ``cacheDuration``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import httpx

from authz.authn.settings import IntrospectionSettings
from authz.authn.token_cache import TtlLru, token_digest
from authz.clock import Clock
from authz.errors import CredentialError, DependencyError

__all__ = ["INACTIVE_CACHE_TTL", "MAX_RESPONSE_BYTES", "Introspector"]

MAX_RESPONSE_BYTES = 64 * 1024  # an introspection answer is a small JSON object
INACTIVE_CACHE_TTL = 10.0  # remember "not active" briefly: absorbs retries of a dead token
DEFAULT_MAX_ENTRIES = 10_000
_INACTIVE: Mapping[str, Any] = MappingProxyType({"active": False})


class Introspector:
    """Introspects opaque tokens for one issuer, with a bounded result cache."""

    def __init__(
        self,
        *,
        issuer: str,
        settings: IntrospectionSettings,
        clock: Clock,
        http: httpx.AsyncClient,
        timeout: float,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.issuer = issuer
        self.settings = settings
        self.clock = clock
        self.http = http
        self.timeout = timeout
        self._cache: TtlLru[Mapping[str, Any]] = TtlLru(max_entries, count_metrics=False)
        self.requests = 0
        self.last_error = ""

    async def introspect(self, token: str) -> Mapping[str, Any]:
        """The active token's claims. Raises :class:`CredentialError` (401 ``inactive_token``) when
        the server says it is not active, :class:`DependencyError` when the server cannot answer."""
        key = token_digest(token)
        claims = self._cache.get(key, self.clock())
        if claims is None:
            claims = await self._post(token)
            exp = claims.get("exp")
            expires = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
            ttl = INACTIVE_CACHE_TTL if claims is _INACTIVE else self.settings.cache_duration
            self._cache.put(key, claims, now=self.clock(), expires_at=expires, max_ttl=ttl)
        if claims is _INACTIVE:
            raise CredentialError("Token is not active", reason="inactive_token")
        return claims

    async def _post(self, token: str) -> Mapping[str, Any]:
        s = self.settings
        form = {"token": token, "token_type_hint": "access_token"}
        auth: httpx.BasicAuth | None = None
        if s.auth_method == "client_secret_post":
            form["client_id"] = s.client_id
            form["client_secret"] = s.client_secret
        else:
            # RFC 6749 section 2.3.1: id and secret are form-urlencoded before Basic encoding.
            auth = httpx.BasicAuth(quote(s.client_id, safe=""), quote(s.client_secret, safe=""))
        self.requests += 1
        try:
            resp = await self.http.post(
                s.endpoint,
                data=form,
                auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
                headers={"accept": "application/json"},
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            self.last_error = f"{s.endpoint}: {type(exc).__name__}"
            raise DependencyError(
                f"introspection for issuer {self.issuer} failed: {self.last_error}",
                reason="issuer_unavailable",
            ) from None
        if resp.status_code != 200 or len(resp.content) > MAX_RESPONSE_BYTES:
            self.last_error = f"{s.endpoint}: HTTP {resp.status_code}"
            raise DependencyError(
                f"introspection for issuer {self.issuer} failed: {self.last_error}",
                reason="issuer_unavailable",
            )
        try:
            doc = json.loads(resp.content)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("active"), bool):
            self.last_error = f"{s.endpoint}: answer has no boolean 'active'"
            raise DependencyError(
                f"introspection for issuer {self.issuer} failed: {self.last_error}",
                reason="issuer_unavailable",
            )
        self.last_error = ""
        # RFC 7662 section 2.2: "active" is the only required member; false means nothing else counts.
        return MappingProxyType(doc) if doc["active"] else _INACTIVE

    def describe(self) -> dict[str, object]:
        return {
            "issuer": self.issuer,
            "endpoint": self.settings.endpoint,
            "client_id": self.settings.client_id,
            "cached": len(self._cache),
            "requests": self.requests,
            "last_error": self.last_error,
        }

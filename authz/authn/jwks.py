"""Per-issuer JWKS cache: fetch, honour ``Cache-Control`` within bounds, refresh ahead of expiry, refetch
on an unknown ``kid`` (rate limited, single-flight), keep the last good keys while the IdP fails.

Behaviour (spec §3.6; istio ``pilot/pkg/model/jwks_resolver.go``; istio#51581):

* keys are fetched lazily on first use, or by :meth:`RemoteKeySource.run` in the background;
* a fetch failure is recorded; the previous key set keeps serving until ``expires + max_staleness``;
  failed attempts back off exponentially (``BACKOFF_INITIAL`` doubling up to ``BACKOFF_MAX``);
* at most one fetch per source is in flight; every caller waiting for keys shares it;
* an unknown ``kid`` triggers a refetch at most once per ``unknown_kid_cooldown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass

import httpx

from authz.authn.jwk import MAX_JWKS_BYTES, KeySet, parse_jwks
from authz.authn.oidc import discover_jwks_uri, read_limited
from authz.authn.settings import JwksSettings
from authz.clock import Clock
from authz.errors import DependencyError
from authz.metrics import JWKS_FETCHES

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "KeySource",
    "RemoteKeySource",
    "StaticKeySource",
    "cache_lifetime",
]

BACKOFF_INITIAL = 1.0  # first retry after a failed fetch: quick, so a late-starting IdP is found fast
BACKOFF_MAX = 60.0  # istiod retries every minute at first; we never wait longer than that
MAX_BACKGROUND_SLEEP = 30.0  # the refresh loop re-reads its deadlines at least this often

_MAX_AGE_RE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)


def cache_lifetime(cache_control: str | None, settings: JwksSettings) -> float:
    """Seconds to cache a JWKS: ``Cache-Control: max-age`` (RFC 9111 section 5.2.2.1) clamped to
    ``[min_cache_duration, max_cache_duration]``; ``no-store``/``no-cache`` mean the minimum; no
    header means ``default_cache_duration``."""
    lo, hi = settings.min_cache_duration, settings.max_cache_duration
    if not cache_control:
        return min(max(settings.default_cache_duration, lo), hi)
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return lo
    m = _MAX_AGE_RE.search(cache_control)
    if m is None:
        return min(max(settings.default_cache_duration, lo), hi)
    return min(max(float(m.group(1)), lo), hi)


class KeySource:
    """Where one issuer's verification keys come from."""

    issuer: str

    def current(self) -> KeySet | None:
        """The keys to verify with now, without waiting; ``None`` if there are none usable."""
        raise NotImplementedError

    async def get(self) -> KeySet:
        """The current keys, fetching if needed. Raises :class:`DependencyError` (``issuer_unavailable``)."""
        raise NotImplementedError

    async def refetch_for_kid(self, kid: str) -> KeySet | None:
        """Keys after (maybe) refetching because ``kid`` is unknown; rate limited."""
        return self.current()

    def describe(self) -> dict[str, object]:
        raise NotImplementedError

    async def run(self) -> None:
        """Background refresh loop (nothing to do for static keys)."""

    async def close(self) -> None:
        """Release resources."""


class StaticKeySource(KeySource):
    """Inline ``jwks`` from a RequestAuthentication: parsed once, never fetched."""

    def __init__(self, *, issuer: str, keys: KeySet, skipped: tuple[str, ...] = ()) -> None:
        self.issuer = issuer
        self.keys = keys
        self.skipped = skipped

    def current(self) -> KeySet:
        return self.keys

    async def get(self) -> KeySet:
        return self.keys

    def describe(self) -> dict[str, object]:
        return {
            "issuer": self.issuer,
            "source": "inline",
            "state": "static",
            "keys": self.keys.describe(),
            "skipped_keys": list(self.skipped),
        }


@dataclass(slots=True)
class _State:
    keys: KeySet | None = None
    fetched_at: float | None = None
    expires_at: float = 0.0
    refresh_at: float = 0.0
    last_attempt: float | None = None
    last_kid_fetch: float | None = None
    next_attempt: float = 0.0
    failures: int = 0
    last_error: str = ""
    skipped: tuple[str, ...] = ()
    jwks_uri: str = ""
    fetches: int = 0


class RemoteKeySource(KeySource):
    """Keys fetched from ``jwks_uri`` (or, when empty, from OIDC discovery of ``issuer``)."""

    def __init__(
        self,
        *,
        issuer: str,
        jwks_uri: str,
        settings: JwksSettings,
        timeout: float,
        clock: Clock,
        http: httpx.AsyncClient | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.issuer = issuer
        self.configured_uri = jwks_uri
        self.settings = settings
        self.timeout = timeout
        self.clock = clock
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._own_http = http is None or bool(settings.ca_bundle_file)
        self._http = http if not self._own_http else None
        self._state = _State(jwks_uri=jwks_uri)
        self._inflight: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._label = issuer or jwks_uri

    # -- reading -------------------------------------------------------------------------------

    def current(self) -> KeySet | None:
        st = self._state
        if st.keys is None:
            return None
        now = self.clock()
        if now > st.expires_at + self.settings.max_staleness:
            return None  # too stale to trust: fail closed until a fetch succeeds
        if now >= st.refresh_at and now >= st.next_attempt:
            self._refresh_in_background()
        return st.keys

    async def get(self) -> KeySet:
        keys = self.current()
        if keys is not None:
            return keys
        if self.clock() >= self._state.next_attempt:
            await self.refresh()
            keys = self.current()
            if keys is not None:
                return keys
        raise DependencyError(
            f"keys of issuer {self._label} are unavailable: {self._state.last_error or 'not fetched yet'}",
            reason="issuer_unavailable",
        )

    async def refetch_for_kid(self, kid: str) -> KeySet | None:
        """Refetch because ``kid`` is unknown, at most once per ``unknown_kid_cooldown`` (counted
        separately from scheduled refreshes), joining any fetch already in flight."""
        st = self._state
        for _ in range(3):  # join an in-flight fetch, then maybe start one, then join that one
            if st.keys is not None and st.keys.has_kid(kid):
                break
            if self._inflight is not None and not self._inflight.done():
                await asyncio.shield(self._inflight)
                continue
            now = self.clock()
            if st.last_kid_fetch is not None and now - st.last_kid_fetch < self.settings.unknown_kid_cooldown:
                break
            st.last_kid_fetch = now
            await self.refresh()
        return self.current()

    # -- fetching ------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch now, single-flight: concurrent callers share one request. Never raises."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        await asyncio.shield(self._inflight)

    def _refresh_in_background(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._inflight = loop.create_task(self._fetch())

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            verify: ssl.SSLContext | bool = True
            if self.settings.ca_bundle_file:
                verify = ssl.create_default_context(cafile=self.settings.ca_bundle_file)
            self._http = httpx.AsyncClient(verify=verify, follow_redirects=False)
        return self._http

    async def _fetch(self) -> None:
        st = self._state
        now = self.clock()
        st.last_attempt = now
        st.fetches += 1
        try:
            async with asyncio.timeout(self.timeout * 2 + 0.1):
                client = self._client()
                uri = self.configured_uri or st.jwks_uri
                if not uri:
                    uri = await discover_jwks_uri(client, self.issuer, timeout=self.timeout)
                    JWKS_FETCHES.labels(issuer=self._label, result="ok").inc()
                    st.jwks_uri = uri
                resp = await read_limited(client, uri, timeout=self.timeout, limit=MAX_JWKS_BYTES)
            parsed = parse_jwks(resp.content, source=f"issuer {self._label} ({uri})")
        except (DependencyError, TimeoutError, OSError, ssl.SSLError) as exc:
            JWKS_FETCHES.labels(issuer=self._label, result="error").inc()
            st.failures += 1
            st.last_error = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                st.last_error = f"fetch timed out after {self.timeout:g}s"
            delay = min(self.backoff_initial * 2 ** (st.failures - 1), self.backoff_max)
            st.next_attempt = self.clock() + delay
            if not self.configured_uri:
                st.jwks_uri = ""  # rediscover next time: the IdP may have moved its keys
            return
        JWKS_FETCHES.labels(issuer=self._label, result="ok").inc()
        now = self.clock()
        lifetime = cache_lifetime(resp.headers.get("cache-control"), self.settings)
        st.keys = parsed.keys
        st.skipped = parsed.skipped
        st.fetched_at = now
        st.expires_at = now + lifetime
        st.refresh_at = now + max(lifetime - self.settings.refresh_before_expiry, lifetime / 2)
        st.failures = 0
        st.next_attempt = 0.0
        st.last_error = ""

    async def run(self) -> None:
        """Refresh ahead of expiry and retry failures with backoff, until cancelled."""
        while True:
            st = self._state
            now = self.clock()
            due = max(st.refresh_at, st.next_attempt) if st.keys is not None else st.next_attempt
            if now >= due:
                await self.refresh()
                continue
            await asyncio.sleep(min(due - now, MAX_BACKGROUND_SLEEP))

    async def close(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._inflight
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- reporting -----------------------------------------------------------------------------

    def state(self) -> str:
        st = self._state
        now = self.clock()
        if st.keys is None:
            return "failing" if st.failures else "empty"
        if now > st.expires_at + self.settings.max_staleness:
            return "expired"
        if now > st.expires_at or st.failures:
            return "stale"
        return "fresh"

    def describe(self) -> dict[str, object]:
        st = self._state
        return {
            "issuer": self.issuer,
            "source": "remote",
            "jwks_uri": st.jwks_uri or self.configured_uri,
            "discovery": not self.configured_uri,
            "state": self.state(),
            "keys": st.keys.describe() if st.keys is not None else [],
            "kids": sorted({k.kid for k in st.keys.keys if k.kid}) if st.keys is not None else [],
            "skipped_keys": list(st.skipped),
            "last_fetch": st.fetched_at,
            "last_attempt": st.last_attempt,
            "expires_at": st.expires_at if st.keys is not None else None,
            "next_refresh": st.refresh_at if st.keys is not None else st.next_attempt,
            "consecutive_failures": st.failures,
            "last_error": st.last_error,
            "fetches": st.fetches,
        }

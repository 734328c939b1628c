"""The orchestrator the engine calls: extract tokens, find keys, verify, build identity and headers.

Decision semantics are Envoy's jwt_authn requirement as istiod generates it (spec §3.3; istio
``pilot/pkg/security/authn/policy_applier.go``): for n rules ``ANY(P0..Pn-1, ALL(ANY(Pi, allow_missing)))``,
which comes down to:

* no token in any configured location: pass, no identity (authorization decides);
* every token present must be valid for one of the rules configured at its location whose issuer
  matches (rules with the same issuer are alternatives: OR);
* a token whose ``iss`` matches no such rule: 401 ``issuer_not_configured``;
* audience mismatch: 403; any other failure: 401; keys unavailable: 401 ``issuer_unavailable``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import httpx

from authz.authn.claims import header_value, lookup_claim
from authz.authn.credentials import ExtractedToken, TokenExtractor, is_cors_preflight
from authz.authn.introspection import Introspector
from authz.authn.jwk import HMAC_ALGORITHMS, KeySet, parse_jwks
from authz.authn.jwks import KeySource, RemoteKeySource, StaticKeySource
from authz.authn.jwt import Decoded, VerifiedToken, check_claims, decode_unverified, looks_like_jws, verify
from authz.authn.model import JwtRule
from authz.authn.settings import AuthnSettings, IssuerSettings
from authz.authn.token_cache import CACHE_HITS, DEFAULT_MAX_ENTRIES, MAX_ENTRY_TTL, TtlLru
from authz.clock import Clock
from authz.decision import HeaderOps
from authz.errors import CredentialError, DependencyError
from authz.request import Request, RequestAuth

__all__ = ["Authenticator", "AuthnResult", "claim_headers"]

MAX_EXTRACTORS = 1024  # distinct rule sets (workloads) whose compiled token locations are kept
_EMPTY_HEADERS = HeaderOps()


@dataclass(frozen=True, slots=True)
class AuthnResult:
    """What authentication concluded. ``error`` set means deny with ``error.status`` (401/403).

    ``auth`` is the request identity (``request.auth.*``) or ``None`` when no token was presented.
    ``headers`` are applied upstream when the request is allowed. ``tokens`` are the verified tokens,
    each with its rule and issuer settings (certificate binding is checked by the engine).
    ``bypassed`` is true for a CORS preflight that skipped JWT verification.
    """

    auth: RequestAuth | None = None
    error: CredentialError | None = None
    headers: HeaderOps = field(default_factory=HeaderOps)
    tokens: tuple[VerifiedToken, ...] = ()
    bypassed: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


_PASS = AuthnResult()
_BYPASS = AuthnResult(bypassed=True)


@dataclass(frozen=True, slots=True)
class _Pending:
    """What :meth:`Authenticator._authenticate_cached` leaves to wait for: the tokens ``found`` (in
    order) and the ``verified`` prefix of them, cached verifications still trusted."""

    found: Sequence[ExtractedToken]
    extractor: TokenExtractor
    verified: list[tuple[VerifiedToken, ExtractedToken]]


@dataclass(frozen=True, slots=True)
class _Locations:
    """The token locations of one set of rules (a workload's), and the results built for them:
    ``no_token`` when none carries a token, ``results`` for one verified token at one location
    (keyed by the token and ``id`` of the extractor's location object). The memos are bounded by
    the token cache's size and dropped with the extractor when issuer settings change."""

    extractor: TokenExtractor
    no_token: AuthnResult
    results: dict[tuple[VerifiedToken, int], AuthnResult]
    only_header: str | None
    """The one header location of the rules, when they configure no cookie (a query parameter is
    searched only when the path has a query): then that header's value alone decides the result."""
    by_header_value: dict[str, tuple[VerifiedToken, float, AuthnResult]]
    """Raw value of ``only_header`` -> its verified token, when the cache entry ends, and the result."""


def claim_headers(rule: JwtRule, claims: Mapping[str, Any], payload_segment: str) -> dict[str, str]:
    """The upstream headers a verified token produces under ``rule``: ``outputPayloadToHeader`` (the
    token's payload segment) and ``outputClaimToHeaders`` (string, int and bool claims; values
    sanitized by :func:`header_value`)."""
    out: dict[str, str] = {}
    if rule.output_payload_to_header:
        out[rule.output_payload_to_header] = payload_segment
    for ch in rule.output_claim_to_headers:
        value = header_value(lookup_claim(claims, ch.claim))
        if value is not None:
            out[ch.header] = value
    return out


class Authenticator:
    """Authenticates requests against jwtRules. One per process; keys and caches live here."""

    def __init__(
        self,
        *,
        settings: AuthnSettings,
        clock: Clock,
        http: httpx.AsyncClient | None = None,
        token_cache_size: int = DEFAULT_MAX_ENTRIES,
        backoff_initial: float | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._http = http
        self._own_http = http is None
        self._backoff_initial = backoff_initial
        self._sources: dict[tuple[str, str, str], KeySource] = {}
        self._source_by_rule: dict[str, KeySource] = {}
        self._introspectors: dict[str, Introspector] = {}
        self._extractors: dict[tuple[JwtRule, ...], _Locations] = {}
        # The same, by the rules tuple's id (held by the entry): callers pass one tuple per workload
        # (the engine's memo), and hashing the rules costs more than the rest of a cached check's look-ups.
        self._extractors_by_id: dict[int, tuple[tuple[JwtRule, ...], _Locations]] = {}
        self._cache: TtlLru[VerifiedToken] = TtlLru(token_cache_size)
        self._tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start background key refresh for every key source known now or created later."""
        self._started = True
        for key, source in self._sources.items():
            self._spawn(key, source)

    async def close(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for t in list(self._closing):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._closing.clear()
        for source in self._sources.values():
            await source.close()
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    def prepare(self, rules: Sequence[JwtRule]) -> None:
        """Create the key sources of ``rules`` ahead of traffic (after :meth:`start` they begin
        fetching at once). Optional: :meth:`authenticate` creates them lazily otherwise."""
        for rule in rules:
            self._source(rule, rule.issuer)

    def update_settings(self, settings: AuthnSettings) -> None:
        """Swap issuer settings (on reload). Cached verifications are dropped: they were checked
        against the old settings (skew, required claims, HMAC secrets)."""
        self.settings = settings
        self._cache.clear()
        self._extractors.clear()  # and with them the results they memoize
        self._extractors_by_id.clear()
        self._introspectors.clear()
        # Key sources whose fetch settings changed are rebuilt on next use; their keys are refetched.
        stale = [
            key
            for key, source in self._sources.items()
            if isinstance(source, RemoteKeySource) and source.settings != settings.for_issuer(key[1]).jwks
        ]
        for key in stale:
            source = self._sources.pop(key)
            task = self._tasks.pop(key, None)
            if task is not None:
                task.cancel()
            with contextlib.suppress(RuntimeError):  # no running loop: nothing was started either
                closing = asyncio.get_running_loop().create_task(source.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        if stale:
            self._source_by_rule.clear()

    # -- the hot path ----------------------------------------------------------------------------

    def authenticate_now(self, request: Request, rules: Sequence[JwtRule]) -> AuthnResult | None:
        """:meth:`authenticate` without waiting: its answer when every token ``request`` carries has a
        verification cached whose key is still trusted (or there is no token), ``None`` when one must be
        verified first (a signature to check, keys or an introspection to fetch): then await
        :meth:`authenticate`. Same code, same answer; only the waiting part is left out."""
        outcome = self._authenticate_cached(request, rules)
        return None if isinstance(outcome, _Pending) else outcome

    async def authenticate(self, request: Request, rules: Sequence[JwtRule]) -> AuthnResult:
        """Authenticate ``request`` against the merged jwtRules of its workload (spec §3.3)."""
        outcome = self._authenticate_cached(request, rules)
        if isinstance(outcome, _Pending):
            return await self._authenticate_pending(outcome)
        return outcome

    def _authenticate_cached(self, request: Request, rules: Sequence[JwtRule]) -> AuthnResult | _Pending:
        """Everything :meth:`authenticate` decides without waiting; a :class:`_Pending` for the rest."""
        http = request.http
        if not rules or http is None:
            return _PASS
        if http.method == "OPTIONS" and is_cors_preflight(http):
            return _BYPASS
        locations = self._locations(rules)
        extractor = locations.extractor
        # The common case first: the rules' one header location (and no query string to search) carries
        # the same header value as an earlier request, whose token was verified and is still trusted.
        header = locations.only_header
        if header is not None and (not extractor.params or "?" not in http.path):
            value = http.headers.get(header)
            if value is not None:
                seen = locations.by_header_value.get(value)
                if seen is not None:
                    if self.clock() < seen[1] and self._key_still_trusted(seen[0]):
                        CACHE_HITS.inc()
                        return seen[2]
                    del locations.by_header_value[value]
        found = extractor.extract(http)
        if not found:
            return locations.no_token
        verified: list[tuple[VerifiedToken, ExtractedToken]] = []
        deadline = 0.0
        for extracted in found:
            entry = self._cached_entry(extracted.token, extractor.rules_for(extracted.rules))
            if entry is None:
                return _Pending(found, extractor, verified)
            verified.append((entry[0], extracted))
            deadline = entry[1]
        if len(verified) > 1:
            return self._result(verified, extractor)
        # One token, already verified: its result is a value of (verified token, location), built once
        # per pair and shared.
        vt, extracted = verified[0]
        key = (vt, id(extracted.location))  # locations are the extractor's own objects
        results = locations.results
        result = results.get(key)
        if result is None:
            result = self._result(verified, extractor)
            if len(results) >= self._cache.max_entries:
                results.clear()
            results[key] = result
        if header is not None and extracted.location.kind == "header":
            by_value = locations.by_header_value
            if len(by_value) >= self._cache.max_entries:
                by_value.clear()
            by_value[http.headers[header]] = (vt, deadline, result)
        return result

    async def _authenticate_pending(self, pending: _Pending) -> AuthnResult:
        """Verify, in order, the tokens from the first one :meth:`_authenticate_cached` found no trusted
        cached verification for (the ones before it were verified from the cache)."""
        extractor = pending.extractor
        verified = pending.verified
        first_missed = len(verified)
        for position in range(first_missed, len(pending.found)):
            extracted = pending.found[position]
            candidates = extractor.rules_for(extracted.rules)
            try:
                # The first was just looked up, with no wait since; later ones may have been cached while
                # an earlier one was being verified.
                verified_token = (
                    None if position == first_missed else self._cached(extracted.token, candidates)
                )
                if verified_token is None:
                    verified_token = await self._verify_slow(extracted.token, candidates)
            except CredentialError as exc:
                return AuthnResult(error=exc)
            verified.append((verified_token, extracted))
        return self._result(verified, extractor)

    def _locations(self, rules: Sequence[JwtRule]) -> _Locations:
        if isinstance(rules, tuple):
            entry = self._extractors_by_id.get(id(rules))
            if entry is not None and entry[0] is rules:
                return entry[1]
            found = self._locations_of(rules)
            if len(self._extractors_by_id) >= MAX_EXTRACTORS:
                self._extractors_by_id.clear()
            self._extractors_by_id[id(rules)] = (rules, found)
            return found
        return self._locations_of(tuple(rules))

    def _locations_of(self, key: tuple[JwtRule, ...]) -> _Locations:
        found = self._extractors.get(key)
        if found is None:
            if len(self._extractors) >= MAX_EXTRACTORS:
                self._extractors.clear()
            extractor = TokenExtractor(key)
            no_token = (
                AuthnResult(headers=HeaderOps(remove=extractor.sanitize)) if extractor.sanitize else _PASS
            )
            only_header = None
            if len(extractor.headers) == 1 and not extractor.cookies:
                only_header = extractor.headers[0][0].name
            found = self._extractors[key] = _Locations(extractor, no_token, {}, only_header, {})
        return found

    def _cached(self, token: str, candidates: Sequence[JwtRule]) -> VerifiedToken | None:
        entry = self._cached_entry(token, candidates)
        return None if entry is None else entry[0]

    def _cached_entry(self, token: str, candidates: Sequence[JwtRule]) -> tuple[VerifiedToken, float] | None:
        """The cached verification of ``token`` under one of ``candidates`` whose key is still trusted,
        with the time it stops being valid; ``None`` when it must be verified."""
        # Keyed by the token itself: hashing a str costs a fifth of a SHA-256 of it, and the cached
        # VerifiedToken holds the token anyway.
        now = self.clock()
        for rule in candidates:
            key = (token, rule.fingerprint)
            entry = self._cache.get_entry(key, now)
            if entry is None:
                continue
            if self._key_still_trusted(entry[0]):
                return entry
            self._cache.discard(key)
        return None

    def _key_still_trusted(self, vt: VerifiedToken) -> bool:
        """The key that verified a cached token must still be in the issuer's current keys."""
        if vt.algorithm == "introspection":
            return True
        if vt.algorithm in HMAC_ALGORITHMS:
            settings = self.settings.for_issuer(vt.rule.issuer)
            return any(k.fingerprint == vt.key_fingerprint for k in settings.hmac_keys)
        source = self._source_by_rule.get(vt.rule.fingerprint)
        keys = source.current() if source is not None else None
        return keys is not None and keys.contains(vt.key_fingerprint)

    # -- the slow path ---------------------------------------------------------------------------

    async def _verify_slow(self, token: str, candidates: Sequence[JwtRule]) -> VerifiedToken:
        if not looks_like_jws(token):
            intro_rules = [r for r in candidates if self.settings.for_issuer(r.issuer).introspection]
            if intro_rules:
                return await self._introspect(token, intro_rules)
        max_bytes = max(self.settings.for_issuer(r.issuer).max_token_bytes for r in candidates)
        decoded = decode_unverified(token, max_bytes=max_bytes)
        payload = decoded[1]
        iss = payload.get("iss")
        matching = [r for r in candidates if not r.issuer or r.issuer == iss]
        if not matching:
            raise CredentialError("Jwt issuer is not configured", reason="issuer_not_configured")
        errors: list[CredentialError] = []
        for rule in matching:
            settings = self.settings.for_issuer(rule.issuer)
            try:
                vt = await self._verify_with_rule(token, decoded, rule, settings)
            except CredentialError as exc:
                errors.append(exc)
                continue
            now = self.clock()
            self._cache.put(
                (token, rule.fingerprint),
                vt,
                now=now,
                expires_at=vt.expires_at,
                max_ttl=MAX_ENTRY_TTL,
            )
            return vt
        # A 403 means some rule verified the signature and only the audience was wrong: report that.
        return _raise_best(errors)

    async def _verify_with_rule(
        self, token: str, decoded: Decoded, rule: JwtRule, settings: IssuerSettings
    ) -> VerifiedToken:
        header = decoded[0]
        alg = header.get("alg")
        if alg in HMAC_ALGORITHMS:
            # HS* keys come only from the issuer settings; no JWKS is needed (or trusted) for them.
            return verify(token, KeySet(), now=self.clock(), rule=rule, settings=settings, decoded=decoded)
        source = self._source(rule, rule.issuer)
        try:
            keys = await source.get()
        except DependencyError as exc:
            raise CredentialError(
                f"Jwks remote fetch is failed: {exc.message}", reason="issuer_unavailable"
            ) from None
        try:
            return verify(token, keys, now=self.clock(), rule=rule, settings=settings, decoded=decoded)
        except CredentialError as exc:
            kid = header.get("kid")
            if exc.reason != "unknown_kid" or not isinstance(kid, str) or keys.has_kid(kid):
                raise
            # istio#51581: the IdP may have rotated; refetch (rate limited, single-flight) and retry once.
            fresh = await source.refetch_for_kid(kid)
            if fresh is None or fresh is keys:
                raise
            return verify(token, fresh, now=self.clock(), rule=rule, settings=settings, decoded=decoded)

    async def _introspect(self, token: str, rules: Sequence[JwtRule]) -> VerifiedToken:
        errors: list[CredentialError] = []
        for rule in rules:
            settings = self.settings.for_issuer(rule.issuer)
            intro = self._introspector(rule, settings)
            try:
                claims = await intro.introspect(token)
                iss = claims.get("iss")
                if rule.issuer and iss is not None and iss != rule.issuer:
                    raise CredentialError("Jwt issuer is not configured", reason="issuer_not_configured")
                if rule.issuer and iss is None:
                    claims = {**claims, "iss": rule.issuer}
                check_claims(claims, now=self.clock(), rule=rule, settings=settings)
            except DependencyError as exc:
                errors.append(
                    CredentialError(f"Token introspection failed: {exc.message}", reason="issuer_unavailable")
                )
                continue
            except CredentialError as exc:
                errors.append(exc)
                continue
            exp = claims.get("exp")
            payload = json.dumps(dict(claims), separators=(",", ":")).encode()
            return VerifiedToken(
                token=token,
                header={},
                claims=claims,
                payload_segment=base64.urlsafe_b64encode(payload).rstrip(b"=").decode(),
                algorithm="introspection",
                kid=None,
                key_fingerprint="introspection",
                expires_at=float(exp) if isinstance(exp, int | float) else None,
                rule=rule,
                settings=settings,
            )
        return _raise_best(errors)

    # -- keys ------------------------------------------------------------------------------------

    @staticmethod
    def _source_key(rule: JwtRule, issuer: str) -> tuple[str, str, str]:
        if rule.jwks:
            return ("inline", issuer, hashlib.sha256(rule.jwks.encode()).hexdigest())
        return ("remote", issuer, rule.jwks_uri)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        return self._http

    def _source(self, rule: JwtRule, issuer: str) -> KeySource:
        source = self._source_by_rule.get(rule.fingerprint)
        if source is not None:
            return source
        key = self._source_key(rule, issuer)
        source = self._sources.get(key)
        if source is not None:
            self._source_by_rule[rule.fingerprint] = source
            return source
        if rule.jwks:
            # Validated at load time (model.py), so parsing cannot fail here.
            parsed = parse_jwks(rule.jwks, source=f"{rule.origin}.jwks")
            source = StaticKeySource(issuer=issuer, keys=parsed.keys, skipped=parsed.skipped)
        else:
            settings = self.settings.for_issuer(issuer)
            extra: dict[str, float] = {}
            if self._backoff_initial is not None:
                extra["backoff_initial"] = self._backoff_initial
            source = RemoteKeySource(
                issuer=issuer,
                jwks_uri=rule.jwks_uri,
                settings=settings.jwks,
                timeout=rule.timeout,
                clock=self.clock,
                http=None if settings.jwks.ca_bundle_file else self._client(),
                **extra,
            )
        self._sources[key] = source
        self._source_by_rule[rule.fingerprint] = source
        if self._started:
            self._spawn(key, source)
        return source

    def _spawn(self, key: tuple[str, str, str], source: KeySource) -> None:
        if key not in self._tasks and isinstance(source, RemoteKeySource):
            self._tasks[key] = asyncio.get_running_loop().create_task(source.run())

    def _introspector(self, rule: JwtRule, settings: IssuerSettings) -> Introspector:
        intro = self._introspectors.get(rule.issuer)
        if intro is None:
            assert settings.introspection is not None
            intro = Introspector(
                issuer=rule.issuer,
                settings=settings.introspection,
                clock=self.clock,
                http=self._client(),
                timeout=rule.timeout,
            )
            self._introspectors[rule.issuer] = intro
        return intro

    # -- results ---------------------------------------------------------------------------------

    def _result(
        self, verified: Sequence[tuple[VerifiedToken, ExtractedToken]], extractor: TokenExtractor
    ) -> AuthnResult:
        set_headers: dict[str, str] = {}
        remove: dict[str, None] = {}
        for vt, extracted in verified:
            rule = vt.rule
            set_headers.update(claim_headers(rule, vt.claims, vt.payload_segment))
            # Envoy JwtProvider.forward=false removes the token header; params and cookies stay.
            if extracted.location.kind == "header" and not rule.forward_original_token:
                remove[extracted.location.name] = None
        for name in extractor.sanitize:
            remove[name] = None
        first = verified[0][0]
        # Several tokens: istio leaves the principal undefined; we use the first location's token.
        auth = RequestAuth(claims=first.claims, space_delimited=first.rule.space_delimited)
        ops = HeaderOps(
            set=tuple(set_headers.items()),
            remove=tuple(n for n in remove if n not in set_headers),
        )
        return AuthnResult(
            auth=auth,
            headers=ops if (ops.set or ops.remove) else _EMPTY_HEADERS,
            tokens=tuple(vt for vt, _ in verified),
        )

    # -- reporting -------------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        """For ``/config_dump``: every key source and introspector, and the token cache size."""
        return {
            "key_sources": [s.describe() for s in self._sources.values()],
            "introspection": [i.describe() for i in self._introspectors.values()],
            "token_cache": {"entries": len(self._cache), "max_entries": self._cache.max_entries},
        }


def _raise_best(errors: Sequence[CredentialError]) -> NoReturn:
    for exc in errors:
        if exc.status == 403:
            raise exc
    raise errors[0]

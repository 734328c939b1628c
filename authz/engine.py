"""The engine: request -> credentials -> keys -> verify -> evaluate -> Decision.

One engine serves every front (gRPC and HTTP ext_authz servers, the bundled proxy in-process). The
fronts only translate. The engine holds the policy :class:`~authz.snapshot.Snapshot` in force and swaps
it atomically on reload; each check reads the snapshot once, so a check never mixes two policy sets.

A check waits only when a token must be verified first (keys or an introspection to fetch). ``check_now``
is the same check for callers that can answer synchronously: it returns ``None`` where ``check`` would
wait, and the caller then awaits ``check``. Both run the same steps (``_prepare``, authentication,
``_conclude``, ``_account``); only the authentication call differs.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from authz.authn import Authenticator, AuthnResult, JwtRule
from authz.authn.jwt import VerifiedToken
from authz.authn.settings import CertificateBinding
from authz.clock import Clock, system_clock
from authz.config import MeshConfig
from authz.decision import Decision, HeaderOps, Reason, TraceEntry, value_builder, with_decision_id
from authz.decision_log import DecisionLog, decision_record
from authz.errors import AuthzError, CredentialError, MalformedRequest
from authz.identity import (
    PeerIdentity,
    PeerTrust,
    check_certificate_binding,
    check_spiffe_binding,
    resolve_peer_identity,
)
from authz.identity.peer import identity_is_timeless
from authz.loop_metrics import CounterChild
from authz.metrics import CHECK_LATENCY, CHECKS, INTERNAL_ERRORS
from authz.policy import PolicyResult, check_http_request, evaluate, normalize_path
from authz.request import EMPTY_MAP, Request, RequestAuth, Workload
from authz.snapshot import Snapshot
from authz.workload import resolve_workload

__all__ = ["PER_REQUEST_HEADERS", "Engine", "remote_ip"]

log = logging.getLogger("authz.engine")

# Normalized paths kept: most traffic repeats a few paths; the cache is dropped whole when full, so a
# flood of unique paths costs at most this many entries.
MAX_CACHED_PATHS = 4096

# Reasons are a closed set of codes; the bound only guards against a bug turning them into free text.
MAX_COUNTER_CHILDREN = 256

# Destination workloads kept, by (namespace, labels text, destination principal): a sidecar authorizer
# sees one, a shared one a few hundred. Reusing the Workload value also lets the compiled policies reuse
# their per-workload plan (CompiledPolicies.plan_for). Dropped whole when full.
MAX_CACHED_WORKLOADS = 1024

# Authentication results whose decision fields (request principal, identity claims, whether a binding
# must be checked) are kept: the authenticator returns the same AuthnResult for a cached token at the
# same location, so this follows its token cache. Dropped whole when full.
MAX_CACHED_IDENTITIES = 10_000

# Decisions kept as templates, by policy result (with the authentication result, peer principal and path
# they were built for): the policy results are memoized per plan, path and token identity, so this
# follows that memo. Dropped whole when full.
MAX_CACHED_DECISIONS = 4096

# Claims copied into the allow decision (dynamic metadata, identity headers): the identity, not the payload.
IDENTITY_CLAIMS = ("iss", "sub", "aud", "azp", "client_id", "scope", "exp")

_NO_HEADERS = HeaderOps()
_observe_latency = CHECK_LATENCY.unlabelled().observe
# What the steps before authentication give a check: the request as the policies see it, the peer
# identity, the normalized path and the workload's jwtRules.
_Prepared = tuple[Request, PeerIdentity, str, tuple[JwtRule, ...]]
# A decision kept as a template: the policy result, authentication result, peer principal and path it was
# built for, whether the tokens are sender-constrained (bindings to check per check), the decision.
_DecisionEntry = tuple[PolicyResult, AuthnResult, str, str, bool, Decision]
_build_decision = value_builder(Decision)  # Decision(...) at half the cost: one per check
# What check_again keeps for a request value: the value, the snapshot, peer trust, mesh and default workload
# it was decided under, its workload, its prepared form, its authentication outcome and the decision.
_Replay = tuple[
    Request, Snapshot, PeerTrust, MeshConfig, Workload, Workload, _Prepared, AuthnResult, Decision
]
MAX_CACHED_REPLAYS = 1024


def remote_ip(request: Request, num_trusted_proxies: int) -> str:
    """Istio's ``remote.ip``: with N trusted proxies, the Nth address from the right of X-Forwarded-For
    (Envoy ``xff_num_trusted_hops``); with 0, or fewer addresses than N, the direct peer address."""
    if num_trusted_proxies <= 0 or request.http is None:
        return request.source.address
    xff = request.http.headers.get("x-forwarded-for", "")
    if not xff:
        return request.source.address
    hops = [h.strip() for h in xff.split(",") if h.strip()]
    if len(hops) < num_trusted_proxies:
        return request.source.address
    return hops[-num_trusted_proxies]


PER_REQUEST_HEADERS = frozenset(
    {
        "x-request-id",
        "x-client-trace-id",
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "x-ot-span-context",
        "uber-trace-id",
        "sw8",
        "grpc-trace-bin",
        "x-cloud-trace-context",
        "x-amzn-trace-id",
        "x-datadog-trace-id",
        "x-datadog-parent-id",
        "x-datadog-sampling-priority",
    }
)
"""Headers that carry a per-request identifier (request ids, trace context): different on every check,
read by nothing in a check unless a policy or rule names them (:meth:`Engine.ignorable_headers`)."""


class Engine:
    """Decides checks. ``check`` never raises: every outcome, errors included, is a :class:`Decision`."""

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        mesh: MeshConfig,
        authenticator: Authenticator,
        default_workload: Workload | None = None,
        peer_trust: PeerTrust | None = None,
        clock: Clock = system_clock,
        decision_log: DecisionLog | None = None,
        fail_open: bool = False,
    ) -> None:
        self._snapshot = snapshot
        self.mesh = mesh
        self.authenticator = authenticator
        self.default_workload = default_workload or Workload()
        self.peer_trust = peer_trust or PeerTrust(
            trust_domain=mesh.trust_domain, trust_domain_aliases=mesh.trust_domain_aliases
        )
        self._clock = clock
        self.decision_log = decision_log
        self.fail_open = fail_open
        self._ids = itertools.count(1)
        self._allow_counters: dict[str, CounterChild] = {}  # CHECKS series by reason
        self._deny_counters: dict[str, CounterChild] = {}
        self._paths: dict[str, str] = {}  # raw :path -> normalized (a pure function of the path)
        self._workloads: dict[tuple[str, str | None, str], tuple[Workload, Workload]] = {}
        self._identities: dict[int, tuple[AuthnResult, str, Mapping[str, Any], bool]] = {}
        self._rules: dict[int, tuple[Workload, Snapshot, tuple[JwtRule, ...]]] = {}
        self._decisions: dict[int, _DecisionEntry] = {}
        self._ignorable: tuple[Snapshot, PeerTrust, frozenset[str]] | None = None
        self._replays: dict[int, _Replay] = {}  # check_again: id(request) -> what it keeps
        self._id_prefix = os.urandom(4).hex()
        self._id_head = f"{self._id_prefix}-"

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def ignorable_headers(self) -> frozenset[str]:
        """The :data:`PER_REQUEST_HEADERS` whose values no check can depend on now: neither a policy, a
        jwtRule (:meth:`Snapshot.headers_read`) nor the peer-identity settings (the XFCC header) read
        them, and nothing else in a check (decision log included) reads headers. A front may therefore
        answer a check from a memo of an earlier request that differs only in their values (the HTTP
        front does, :class:`authz.server.http_ext_authz.TranslationMemo`). Kept per policy set and
        settings; the same object is returned while they do not change."""
        snapshot, trust = self._snapshot, self.peer_trust
        kept = self._ignorable
        if kept is not None and kept[0] is snapshot and kept[1] is trust:
            return kept[2]
        ignorable = PER_REQUEST_HEADERS - snapshot.headers_read() - {trust.xfcc_key}
        if kept is not None and kept[2] == ignorable:
            ignorable = kept[2]  # unchanged: the same object, so memos built on it stay
        self._ignorable = (snapshot, trust, ignorable)
        return ignorable

    def swap(self, snapshot: Snapshot) -> None:
        """Put a new, already validated and compiled, policy set in force (atomic reference swap)."""
        self._snapshot = snapshot

    def _next_id(self) -> str:
        return f"{self._id_head}{next(self._ids):x}"

    def _workload(self, request: Request) -> Workload:
        """:func:`resolve_workload` for ``request``, memoized: the same inputs give the same value."""
        ctx = request.context_extensions
        principal = request.destination.principal
        key = (ctx.get("namespace", ""), ctx.get("labels"), principal)
        default = self.default_workload
        entry = self._workloads.get(key)
        if entry is not None and entry[0] is default:
            return entry[1]
        workload = resolve_workload(ctx, principal, default)
        if len(self._workloads) >= MAX_CACHED_WORKLOADS:
            self._workloads.clear()
        self._workloads[key] = (default, workload)
        return workload

    async def check(self, request: Request, workload: Workload | None = None) -> Decision:
        """Decide ``request`` for ``workload`` (by default the one its context extensions name). Waits only
        when a token must be verified first (keys or an introspection to fetch); see :meth:`check_now`."""
        started = time.perf_counter()
        snapshot = self._snapshot
        if workload is None:
            workload = self._workload(request)
        try:
            prepared = self._prepare(snapshot, request, workload)
            authn = await self.authenticator.authenticate(prepared[0], prepared[3])
            decision = self._conclude(snapshot, workload, prepared, authn)
        except Exception as exc:  # every failure is a deny (_failure logs bugs)
            decision = self._failure(exc)
        return self._account(decision, request, workload, started)

    def check_now(self, request: Request, workload: Workload | None = None) -> Decision | None:
        """:meth:`check` when it can answer without waiting, else ``None``: then await :meth:`check`.

        ``None`` exactly when authentication must wait, i.e. a token the request carries has no cached
        verification whose key is still trusted (:meth:`Authenticator.authenticate_now`); nothing is
        counted or logged for it. Otherwise the same decision :meth:`check` makes, by the same code:
        every check still resolves the peer, validates the request, checks token expiry and key trust,
        and evaluates the policy set in force."""
        return self._decide_now(request, workload, time.perf_counter(), keep=False)

    def check_again(self, request: Request) -> Decision | None:
        """:meth:`check_now` for a request value its caller presents again (the HTTP front's
        :class:`~authz.server.http_ext_authz.TranslationMemo` does), deciding it the same way.

        What depends only on the value and the settings in force is kept with it: its workload, its peer
        identity, normalized path and jwtRules, and the decision for its authentication outcome. A repeat
        re-authenticates (the authenticator checks token expiry and key trust, every time) and, while that
        gives the same outcome, takes the kept decision with a new id and is counted like any check. Kept
        only when the peer identity cannot depend on the time (no certificate, no XFCC) and the tokens
        are not sender-constrained (their bindings are checked per check)."""
        started = time.perf_counter()
        snapshot = self._snapshot
        kept = self._replays.get(id(request))
        if (
            kept is not None
            and kept[0] is request
            and kept[1] is snapshot
            and kept[2] is self.peer_trust
            and kept[3] is self.mesh
            and kept[4] is self.default_workload
        ):
            prepared = kept[6]
            try:
                again = self.authenticator.authenticate_now(prepared[0], prepared[3])
            except Exception:  # decided below by the full path, which meets the same error
                again = None
            if again is not None and again is kept[7]:
                return self._account(with_decision_id(kept[8], self._next_id()), request, kept[5], started)
        return self._decide_now(request, None, started, keep=True)

    def _decide_now(
        self, request: Request, workload: Workload | None, started: float, *, keep: bool
    ) -> Decision | None:
        """:meth:`check_now`; with ``keep``, what :meth:`check_again` reuses is kept for ``request``."""
        snapshot = self._snapshot
        if workload is None:
            workload = self._workload(request)
        try:
            prepared = self._prepare(snapshot, request, workload)
            authn = self.authenticator.authenticate_now(prepared[0], prepared[3])
            if authn is None:
                return None
            outcome = self._outcome(snapshot, workload, prepared, authn)
            if isinstance(outcome, Decision):
                decision = outcome
            else:
                decision = with_decision_id(outcome[5], self._next_id())
                if keep and not outcome[4] and identity_is_timeless(request, self.peer_trust):
                    if len(self._replays) >= MAX_CACHED_REPLAYS:
                        self._replays.clear()
                    self._replays[id(request)] = (
                        request,  # held: its id stays unique while kept
                        snapshot,
                        self.peer_trust,
                        self.mesh,
                        self.default_workload,
                        workload,
                        prepared,
                        authn,
                        outcome[5],
                    )
        except Exception as exc:  # every failure is a deny (_failure logs bugs)
            decision = self._failure(exc)
        return self._account(decision, request, workload, started)

    def _failure(self, exc: Exception) -> Decision:
        """The decision for a check that raised ``exc``: 400 for a malformed request, the error's reason
        for our own errors, and for anything else (a bug) an internal error, counted and logged: fail
        closed (or open with ``fail_open``). Called from the ``except`` block, so the log has the trace."""
        if isinstance(exc, MalformedRequest):
            return self.malformed(exc)
        if isinstance(exc, AuthzError):
            return self._error_decision(exc.reason, str(exc), self._next_id())
        log.exception("internal error deciding a check")
        INTERNAL_ERRORS.labels(front="engine").inc()
        return self._error_decision(
            Reason.INTERNAL_ERROR, f"internal error: {type(exc).__name__}", self._next_id()
        )

    def _account(self, decision: Decision, request: Request, workload: Workload, started: float) -> Decision:
        """Count ``decision``, observe its latency, log it (when a decision log is configured)."""
        elapsed = time.perf_counter() - started
        counters = self._allow_counters if decision.allowed else self._deny_counters
        counter = counters.get(decision.reason)
        if counter is None:
            counter = CHECKS.labels(decision="allow" if decision.allowed else "deny", reason=decision.reason)
            if len(counters) < MAX_COUNTER_CHILDREN:
                counters[decision.reason] = counter
        counter.inc()
        _observe_latency(elapsed)
        if self.decision_log is not None:
            self.decision_log.record(
                decision_record(decision, request, workload, now=self._clock(), latency_s=elapsed)
            )
        return decision

    def malformed(self, exc: MalformedRequest, decision_id: str = "") -> Decision:
        """The deny for a request the front could not even translate (400)."""
        return Decision(
            allowed=False,
            status=400,
            reason=exc.reason,
            message=exc.message,
            decision_id=decision_id or self._next_id(),
        )

    def _error_decision(self, reason: str, message: str, decision_id: str) -> Decision:
        if self.fail_open:
            return Decision(
                allowed=True,
                status=200,
                reason=reason,
                message=f"fail open: {message}",
                decision_id=decision_id,
            )
        return Decision(allowed=False, status=403, reason=reason, message=message, decision_id=decision_id)

    def _prepare(self, snapshot: Snapshot, request: Request, workload: Workload) -> _Prepared:
        """Steps 1-2 of a check and the jwtRules step 3 needs: the request as the policies see it (the
        verified peer principal, remote.ip), the peer identity, the normalized path, the rules."""
        now = self._clock()
        # 1. Peer identity: only verified sources become source.principal (authz.identity.peer).
        peer = resolve_peer_identity(request, trust=self.peer_trust, now=now)
        trusted_proxies = self.mesh.num_trusted_proxies
        if peer.principal != request.source.principal or (trusted_proxies > 0 and not request.remote_ip):
            changes: dict[str, Any] = {}
            if peer.principal != request.source.principal:
                changes["source"] = replace(request.source, principal=peer.principal)
            if trusted_proxies > 0 and not request.remote_ip:
                # remote.ip from X-Forwarded-For; with no trusted proxies it is the peer address, which the
                # matchers already fall back to, so the request need not be copied for it.
                changes["remote_ip"] = remote_ip(request, trusted_proxies)
            request = replace(request, **changes)
        # 2. Path: normalized once, as the mesh's HCM would (idempotent when Envoy already did it).
        path = ""
        if request.http is not None:
            check_http_request(request.http)  # Envoy's HCM rejects these with 400; so do we
            raw_path = request.http.path
            path = self._paths.get(raw_path, "")
            if not path:
                path = normalize_path(raw_path, self.mesh.path_normalization)
                if len(self._paths) >= MAX_CACHED_PATHS:
                    self._paths.clear()
                self._paths[raw_path] = path
        # 3's rules: snapshot.jwt_rules_for(workload), memoized per workload value (see _workload).
        entry = self._rules.get(id(workload))
        if entry is None or entry[0] is not workload or entry[1] is not snapshot:
            entry = self._remember_rules(snapshot, workload)
        return request, peer, path, entry[2]

    def _conclude(
        self, snapshot: Snapshot, workload: Workload, prepared: _Prepared, authn: AuthnResult
    ) -> Decision:
        """Steps 3 (its outcome ``authn``) and 4 of a check: credentials, bindings, policies, decision."""
        outcome = self._outcome(snapshot, workload, prepared, authn)
        if isinstance(outcome, Decision):
            return outcome
        return with_decision_id(outcome[5], self._next_id())

    def _outcome(
        self, snapshot: Snapshot, workload: Workload, prepared: _Prepared, authn: AuthnResult
    ) -> Decision | _DecisionEntry:
        """:meth:`_conclude` up to the id: a credential deny, or the kept decision for the outcome."""
        request, peer, path, _ = prepared
        # 3. Credentials: RequestAuthentication semantics (authz.authn).
        if authn.error is not None:
            return _credential_decision(authn.error, peer.principal, path, self._next_id())
        # 4. Policies: AUDIT -> DENY -> ALLOW (authz.policy). Pure: evaluated before the token bindings are
        # checked below, whose failure decides the check whatever the policies say.
        result: PolicyResult = evaluate(snapshot.policies, request, workload, authn.auth, path=path)
        # The decision is a pure function of the policy result, the authentication result (its headers
        # and identity), the peer principal and the path: the evaluator and the authenticator share one
        # result object per outcome, so the decision is built once per combination and copied with
        # this check's id. Kept by the policy result (held by the entry so that its id stays unique), one
        # entry each: a policy result is memoized per path and token identity, so its entry rarely changes.
        entry = self._decisions.get(id(result))
        if (
            entry is None
            or entry[0] is not result
            or entry[1] is not authn
            or entry[2] != peer.principal
            or entry[3] != path
        ):
            entry = self._remember_decision(result, authn, peer.principal, path)
        if entry[4]:  # sender-constrained tokens: checked on every check, against this check's peer
            try:
                _check_bindings(authn, peer.principal, peer.certificate_thumbprint)
            except CredentialError as exc:
                return _credential_decision(exc, peer.principal, path, self._next_id())
        return entry

    def _remember_decision(
        self, result: PolicyResult, authn: AuthnResult, principal: str, path: str
    ) -> _DecisionEntry:
        """Build the decision for these results (its id left empty) and keep it (see :meth:`_conclude`)."""
        request_principal, claims, bound = "", EMPTY_MAP, False
        if authn.auth is not None:
            request_principal, claims, bound = self._identity(authn, authn.auth)
        decision = _build_decision(
            allowed=result.allowed,
            status=200 if result.allowed else 403,
            reason=result.reason,
            message="" if result.allowed else "RBAC: access denied",
            policy_id=result.policy_id,
            trace=result.trace,
            headers=authn.headers if result.allowed else _NO_HEADERS,
            principal=principal,
            request_principal=request_principal,
            claims=claims,
            audit=result.audit,
            audit_policy_id=result.audit_policy_id,
            shadow=result.shadow,
            normalized_path=path,
        )
        if len(self._decisions) >= MAX_CACHED_DECISIONS:
            self._decisions.clear()
        entry = self._decisions[id(result)] = (result, authn, principal, path, bound, decision)
        return entry

    def _identity(self, authn: AuthnResult, auth: RequestAuth) -> tuple[str, Mapping[str, Any], bool]:
        """The request principal and identity claims of ``auth`` (a read-only mapping shared by every
        decision for that identity), and whether its tokens are sender-constrained; computed once per
        authentication result (the authenticator shares one per cached token and location)."""
        entry = self._identities.get(id(authn))
        if entry is not None and entry[0] is authn:
            return entry[1], entry[2], entry[3]
        principal, claims = auth.principal, MappingProxyType(dict(_identity_claims(auth)))
        bound = any(_is_bound(token) for token in authn.tokens)
        if len(self._identities) >= MAX_CACHED_IDENTITIES:
            self._identities.clear()
        self._identities[id(authn)] = (authn, principal, claims, bound)  # held: its id stays unique
        return principal, claims, bound

    def _remember_rules(
        self, snapshot: Snapshot, workload: Workload
    ) -> tuple[Workload, Snapshot, tuple[JwtRule, ...]]:
        """``snapshot.jwt_rules_for(workload)``, kept by the workload value (see :meth:`_prepare`)."""
        if len(self._rules) >= MAX_CACHED_WORKLOADS:
            self._rules.clear()
        entry = self._rules[id(workload)] = (workload, snapshot, snapshot.jwt_rules_for(workload))
        return entry


def _is_bound(token: VerifiedToken) -> bool:
    """Whether :func:`_check_bindings` has anything to check for ``token``."""
    settings = token.settings
    return (
        settings.certificate_binding is not CertificateBinding.DISABLED
        or "cnf" in token.claims
        or settings.spiffe_binding is not None
    )


def _check_bindings(authn: AuthnResult, principal: str, thumbprint: str) -> None:
    """Sender-constrained tokens: RFC 8705 certificate binding and our SPIFFE-ID binding, per issuer."""
    for token in authn.tokens:
        settings = token.settings
        if settings.certificate_binding is not CertificateBinding.DISABLED or "cnf" in token.claims:
            mode = settings.certificate_binding.value
            check_certificate_binding(token.claims, thumbprint, mode=mode)  # type: ignore[arg-type]
        spiffe = settings.spiffe_binding
        if spiffe is not None:
            check_spiffe_binding(
                token.claims, claim=spiffe.claim, peer_spiffe_id=principal, pattern=spiffe.pattern or None
            )


def _identity_claims(auth: RequestAuth | None) -> Mapping[str, Any]:
    if auth is None:
        return {}
    return {k: auth.claims[k] for k in IDENTITY_CLAIMS if k in auth.claims}


def _credential_decision(error: CredentialError, principal: str, path: str, decision_id: str) -> Decision:
    return Decision(
        decision_id=decision_id,
        allowed=False,
        status=error.status,
        reason=error.reason,
        message=error.message,
        www_authenticate=error.www_authenticate if error.status == 401 else "",
        principal=principal,
        normalized_path=path,
        trace=(TraceEntry(stage="authn", policy="", rule=None, matched=False, detail=error.message),),
    )

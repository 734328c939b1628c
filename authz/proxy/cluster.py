"""Clusters: a service's endpoints (from ServiceEntry), its policy (from DestinationRule), LB,
outlier detection, retries and the pools: ``cluster.forward(request)`` is the
``cluster -> pool -> connection`` step.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from mypy_extensions import mypyc_attr

from authz.clock import Clock, monotonic_clock
from authz.proxy.http1 import ResponseHead, strip_hop_by_hop
from authz.proxy.lb import Endpoint, LoadBalancer
from authz.proxy.message import ProxyRequest, ProxyResponse, StreamInfo, local_response
from authz.proxy.model import (
    ConnectionPoolSettings,
    DestinationRule,
    MeshView,
    RetryPolicy,
    ServiceEntry,
    TLSSettings,
    TrafficPolicy,
    merge_subset_policy,
)
from authz.proxy.origination import ORIGINATING_MODES, Origination, origination_context, policy_tls_settings
from authz.proxy.outlier import OutlierDetector
from authz.proxy.pool import (
    CircuitBreaker,
    EndpointPool,
    Overflow,
    UpstreamBody,
    UpstreamConnection,
    UpstreamError,
)
from authz.proxy.retry import Failure, Outcome, backoff, should_retry

__all__ = [
    "IDEMPOTENT_METHODS",
    "TLS_MODE_LABEL",
    "Cluster",
    "ClusterKey",
    "ClusterManager",
    "UnknownService",
]

TLS_MODE_LABEL = "security.istio.io/tlsMode"  # Istio auto-mTLS: endpoints labelled "istio" have a sidecar


class UnknownService(LookupError):
    """No ServiceEntry (or no endpoint in the subset) for a route destination: 503 with flag NR/UH."""


@dataclass(frozen=True, slots=True)
class ClusterKey:
    host: str
    port: int | None
    subset: str = ""

    @property
    def name(self) -> str:  # Istio's cluster name: outbound|port|subset|host
        return f"outbound|{self.port or ''}|{self.subset}|{self.host}"


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 §9.2.2


def _local_failure(status: int, flag: str, reason: str, info: StreamInfo) -> ProxyResponse:
    info.flags.add(flag)
    return local_response(
        status, f"upstream connect error or disconnect/reset before headers. reset reason: {reason}"
    )


@mypyc_attr(native_class=False)  # a regular class even compiled (authz.native): its methods can be wrapped
class Cluster:
    """One upstream cluster. ``rng`` and ``clock`` are injected so tests can drive picks and ejections."""

    def __init__(
        self,
        name: str,
        endpoints: list[Endpoint],
        policy: TrafficPolicy,
        *,
        ssl_context: Callable[[], ssl.SSLContext | None],
        expected_ids: Mapping[str, tuple[str, ...]] | None = None,
        rng: random.Random | None = None,
        clock: Clock = monotonic_clock,
        origination: Origination | None = None,
    ) -> None:
        self.name = name
        self.endpoints = endpoints
        lbs = policy.load_balancer
        weighted = len({e.weight for e in endpoints}) > 1  # equal weights: the unweighted pickers, no cost
        self.lb = (
            LoadBalancer(lbs.simple, lbs.hash_header, weighted=weighted)
            if lbs
            else LoadBalancer(weighted=weighted)
        )
        self.breaker = CircuitBreaker(policy.connection_pool or ConnectionPoolSettings())
        self.outlier = OutlierDetector(policy.outlier_detection, len(endpoints))
        self.rng = rng or random.Random()
        self.clock = clock
        ids = expected_ids or {}
        self.pools = {
            e.key: EndpointPool(
                e,
                self.breaker,
                ssl_context=ssl_context,
                expected_ids=ids.get(e.key, ()),
                origination=origination,
            )
            for e in endpoints
        }

    def choose(self, tried: list[str], hash_key: str | None) -> Endpoint:
        """LB pick over healthy endpoints, preferring untried ones (Envoy ``previous_hosts`` predicate)."""
        if len(self.endpoints) == 1:  # the only host, ejected or not (Envoy's panic mode keeps it)
            return self.endpoints[0]
        healthy = self.outlier.healthy(self.endpoints, now=self.clock())
        fresh = [e for e in healthy if e.key not in tried] or healthy
        active = {k: p.active for k, p in self.pools.items()}
        return self.lb.pick(fresh, self.rng, active=active, hash_key=hash_key)

    @staticmethod
    def _send(
        conn: UpstreamConnection, request: ProxyRequest, replayable: bool
    ) -> Coroutine[Any, Any, ResponseHead]:
        """One try's send, as a coroutine the caller awaits (no frame of its own in the await chain)."""
        body = request.body
        if body.empty:
            read = None
        elif replayable:
            read = body.replay().read
        else:
            read = body.read
        return conn.send(
            request.method,
            request.target,
            request.authority,
            request.headers,
            length=body.length,
            read_body=read,
        )

    async def forward(
        self,
        request: ProxyRequest,
        info: StreamInfo,
        *,
        retry: RetryPolicy | None,
        replayable: bool,
        hash_key: str | None = None,
        resent: bool = False,
    ) -> ProxyResponse:
        """Send ``request`` with retries; the response body streams from the pooled connection.

        ``resent``: a try of :meth:`begin_now` already found its pooled connection closed by the server and
        this is the one resend :meth:`may_resend` allows."""
        info.upstream_cluster = self.name
        tried: list[str] = []
        retries_done = 0
        stale_resent = resent
        per_try = retry.per_try_timeout if retry is not None else None
        can_retry = replayable or request.body.empty
        while True:
            endpoint = self.choose(tried, hash_key)
            pool = self.pools[endpoint.key]
            info.upstream_host = endpoint.key
            info.attempts += 1
            outcome: Outcome
            response: ProxyResponse | None = None
            conn: UpstreamConnection | None = None
            try:
                conn = await pool.acquire()
                if per_try is None:
                    head = await self._send(conn, request, replayable)
                else:
                    async with asyncio.timeout(per_try):
                        head = await self._send(conn, request, replayable)
            except Overflow:
                return _local_failure(503, "UO", "overflow", info)
            except TimeoutError:
                if conn is not None:
                    conn.close()
                    pool.release(conn)
                outcome = Outcome(failure="timeout")
            except UpstreamError as exc:
                if conn is not None:
                    pool.release(conn)
                if not stale_resent and can_retry and self.may_resend(request, exc):
                    stale_resent = True  # a pooled connection the server had closed: resend once, not a retry
                    continue
                outcome = Outcome(failure=exc.failure)
            except BaseException:
                if conn is not None:
                    conn.close()
                    pool.release(conn)
                raise
            else:
                assert conn is not None
                response = self.response(head, request, conn, pool)
                if retry is None and self.outlier.policy is None:
                    return response  # nothing to account or retry: the common case, kept short
                outcome = Outcome(status=head.status, grpc_status=head.get("grpc-status") or "")
            self.outlier.record(endpoint.key, outcome.status, now=self.clock())
            if can_retry and should_retry(retries_done, outcome, retry):
                assert retry is not None
                if response is not None:
                    response.body.abort()
                retries_done += 1
                tried.append(endpoint.key)
                await asyncio.sleep(backoff(retries_done, retry.backoff_base, self.rng))
                continue
            if (
                retry is not None
                and retries_done
                and retries_done >= retry.attempts
                and should_retry(retries_done - 1, outcome, retry)
            ):
                info.flags.add("URX")  # retry limit reached on a retriable outcome
            if response is not None:
                return response
            return self.failure_response(outcome.failure, info)

    def begin_now(
        self, request: ProxyRequest, info: StreamInfo
    ) -> tuple[UpstreamConnection, EndpointPool] | None:
        """The one try of :meth:`forward` (no retry policy) for a request without a body, started without
        waiting: when this cluster has one endpoint, no outlier detection to account and an idle pooled
        connection, the request is written to it. The caller then waits for the head
        (``UpstreamConnection.poll_head``), builds the reply with :meth:`response` and maps failures with
        :meth:`failure_response` (or resends once through ``forward(..., resent=True)`` when the error says
        nothing was sent). None: call :meth:`forward`, nothing was done."""
        if len(self.endpoints) != 1 or self.outlier.policy is not None or not request.body.empty:
            return None
        endpoint = self.endpoints[0]
        pool = self.pools[endpoint.key]
        try:
            conn = pool.acquire_now()
        except Overflow:
            return None  # forward answers it (503 UO)
        if conn is None:
            return None
        try:
            conn.begin(
                request.method,
                request.target,
                request.authority,
                request.headers,
                length=request.body.length,
                body=False,
            )
        except UpstreamError:
            pool.release(conn)
            return None  # the write failed at once: nothing sent, forward tries afresh
        info.upstream_cluster = self.name
        info.upstream_host = endpoint.key
        info.attempts += 1
        return conn, pool

    @staticmethod
    def may_resend(request: ProxyRequest, error: UpstreamError) -> bool:
        """A pooled connection closed before any byte of a response came back (the server gave up on it
        as we reused it): the request may be sent once more on a fresh connection, when its method is
        idempotent. A proxy must not retry a non-idempotent request by itself (RFC 9110 §9.2.2, RFC 9112
        §9.3.1): the server may have acted on it before closing."""
        return error.sent_nothing and request.method in IDEMPOTENT_METHODS

    @staticmethod
    def failure_response(failure: Failure | None, info: StreamInfo) -> ProxyResponse:
        """Envoy's local reply when the last try failed without a response (flag UT, UF or UC)."""
        if failure == "timeout":
            return Cluster._timeout(info)
        if failure == "connect_failure":
            return _local_failure(503, "UF", "connection failure", info)
        return _local_failure(503, "UC", "connection termination", info)

    @staticmethod
    def _timeout(info: StreamInfo) -> ProxyResponse:
        info.flags.add("UT")
        return local_response(504, "upstream request timeout")

    def response(
        self, head: ResponseHead, request: ProxyRequest, conn: UpstreamConnection, pool: EndpointPool
    ) -> ProxyResponse:
        no_body = head.body == "none" or request.method == "HEAD"
        length = head.content_length if head.body in ("length", "none") else None
        if head.status in (204,) or (100 <= head.status < 200):
            length = None
        body = UpstreamBody(conn, pool)
        return ProxyResponse(
            head.status, head.reason, strip_hop_by_hop(head.headers), body, length=length, no_body=no_body
        )

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


class ClusterManager:
    """Builds clusters from ServiceEntry endpoints and DestinationRule policies, once per key, lazily."""

    def __init__(
        self,
        mesh: MeshView,
        *,
        ssl_context: Callable[[], ssl.SSLContext | None],
        trust_domain: str,
        rng: random.Random | None = None,
        clock: Clock = monotonic_clock,
    ) -> None:
        self._services: dict[str, ServiceEntry] = {}
        for se in mesh.service_entries:
            for h in se.hosts:
                self._services.setdefault(h, se)
        self._rules: dict[str, DestinationRule] = {}
        for dr in mesh.destination_rules:
            self._rules.setdefault(dr.host, dr)
        self._ssl_context = ssl_context
        # DR SIMPLE/MUTUAL contexts are built now, once per distinct settings: unreadable certificate files
        # fail the configuration (load or reload), not the first request.
        self._origination_contexts: dict[TLSSettings, ssl.SSLContext] = {
            tls: origination_context(tls)
            for tls in policy_tls_settings(
                p
                for dr in mesh.destination_rules
                for p in (dr.traffic_policy, *(s.traffic_policy for s in dr.subsets))
            )
        }
        self._trust_domain = trust_domain
        self._rng = rng or random.Random()
        self._clock = clock
        self._clusters: dict[ClusterKey, Cluster] = {}

    def add(self, key: ClusterKey, cluster: Cluster) -> None:
        self._clusters[key] = cluster

    def get(self, key: ClusterKey) -> Cluster:
        cluster = self._clusters.get(key)
        if cluster is None:
            cluster = self._build(key)
            self._clusters[key] = cluster
        return cluster

    def _policy(self, key: ClusterKey, port: int) -> TrafficPolicy:
        """The DestinationRule policy for service ``port`` (port-level settings first, then the subset's)."""
        dr = self._rules.get(key.host)
        if dr is None:
            return TrafficPolicy()
        if key.subset:
            for s in dr.subsets:
                if s.name == key.subset:
                    return merge_subset_policy(dr.traffic_policy, s.traffic_policy, port)
            raise UnknownService(f"subset {key.subset!r} of {key.host} is not defined")
        return merge_subset_policy(dr.traffic_policy, None, port)

    def _build(self, key: ClusterKey) -> Cluster:
        se = self._services.get(key.host)
        if se is None:
            raise UnknownService(f"no ServiceEntry for {key.host}")
        if key.port is not None:
            port = next((p for p in se.ports if p.number == key.port), None)
            if port is None:
                raise UnknownService(f"{key.host} has no port {key.port}")
        elif se.ports:
            port = se.ports[0]
        else:
            raise UnknownService(f"{key.host} declares no ports")
        policy = self._policy(key, port.number)
        labels: Mapping[str, str] = {}
        if key.subset:
            dr = self._rules[key.host]
            labels = next(s.labels for s in dr.subsets if s.name == key.subset)
        tls_mode = policy.tls.mode if policy.tls else ""
        sans = policy.tls.subject_alt_names if policy.tls else ()
        origination = None
        if policy.tls is not None and tls_mode in ORIGINATING_MODES:
            # Envoy auto_sni: the request's host; the destination host stands for it (one pool per endpoint)
            origination = Origination(
                self._origination_contexts[policy.tls], policy.tls.sni or key.host, sans
            )
            sans = ()  # checked by the origination, not as SPIFFE IDs
        endpoints: list[Endpoint] = []
        expected: dict[str, tuple[str, ...]] = {}
        sources = se.endpoints if se.endpoints else ()
        for ep in sources:
            if any(ep.labels.get(k) != v for k, v in labels.items()):
                continue
            number = ep.ports.get(port.name) if port.name else None
            number = number or port.target_port or port.number
            tls = (
                tls_mode == "ISTIO_MUTUAL"
                or origination is not None
                or (tls_mode == "" and ep.labels.get(TLS_MODE_LABEL) == "istio")
            )
            identity = (
                f"spiffe://{self._trust_domain}/ns/{se.namespace}/sa/{ep.service_account}"
                if ep.service_account
                else ""
            )
            e = Endpoint(ep.address, number, ep.labels, identity, tls, ep.weight)
            endpoints.append(e)
            if origination is not None:
                continue  # a TLS-originated upstream is not a mesh workload: no SPIFFE ID to expect
            if sans:
                expected[e.key] = sans
            elif identity:
                expected[e.key] = (identity,)
        if not sources and se.resolution in ("DNS", "NONE"):
            endpoints.append(
                Endpoint(
                    key.host,
                    port.target_port or port.number,
                    tls=tls_mode == "ISTIO_MUTUAL" or origination is not None,
                )
            )
        if not endpoints:
            raise UnknownService(f"no endpoints for {key.name}")
        return Cluster(
            key.name,
            endpoints,
            policy,
            ssl_context=self._ssl_context,
            expected_ids=expected,
            rng=self._rng,
            clock=self._clock,
            origination=origination,
        )

    def close(self) -> None:
        for c in self._clusters.values():
            c.close()

"""The sidecar: inbound listener (mTLS + authorization -> local app), outbound listener (routing -> clusters),
admin listener (``/metrics``, ``/ready``), and atomic configuration reload.

A configuration generation (router + clusters) is compiled once and swapped whole on reload; requests in
flight finish on the generation they started with, so a reload drops no connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import generate_latest

from authz.clock import Clock, monotonic_clock
from authz.decision import Decision
from authz.errors import AuthzError, MalformedRequest
from authz.proxy.authz_client import (
    AllowAll,
    Authorizer,
    apply_allow,
    build_request,
    deny_response,
    error_decision,
)
from authz.proxy.cluster import Cluster, ClusterKey, ClusterManager, UnknownService
from authz.proxy.http1 import RequestHead
from authz.proxy.lb import Endpoint, pick_weighted
from authz.proxy.listener import ConnectionInfo, Downstream, Listener
from authz.proxy.local_reply import direct_reply, redirect_reply
from authz.proxy.message import (
    BytesBody,
    ProxyRequest,
    ProxyResponse,
    RequestBody,
    StreamInfo,
    local_response,
)
from authz.proxy.metrics import ProxyMetrics
from authz.proxy.mirror import HashingBody, Mirrorer, ResponseSummary, shadow_authority, summarize
from authz.proxy.model import HTTPRoute, PeerAuthentication, TrafficPolicy
from authz.proxy.mtls import client_context, server_context
from authz.proxy.paths import PathNormalizer
from authz.proxy.pool import UpstreamError
from authz.proxy.router import Router, rewrite_target
from authz.proxy.settings import SidecarConfig
from authz.proxy.telemetry import TRACE_HEADERS, access_log_line, child_trace_headers, request_id
from authz.proxy.xfcc import XFCC_HEADER, ClientCertForwarding, certificate_uris
from authz.request import Peer, Request, Workload
from authz.workload import selects

__all__ = ["Sidecar", "peer_authentication_mode"]

log = logging.getLogger("authz.proxy")
access_log = logging.getLogger("authz.proxy.access")

_GRPC_NAMES = (
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS PERMISSION_DENIED "
    "RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE "
    "DATA_LOSS UNAUTHENTICATED"
)
GRPC_CODES = {
    name: code for code, name in enumerate(_GRPC_NAMES.split())
}  # gRPC status codes (grpc/doc/statuscodes.md), for fault abort grpcStatus


def peer_authentication_mode(
    policies: tuple[PeerAuthentication, ...],
    workload: Workload,
    *,
    root_namespace: str,
    port: int | None = None,
) -> str:
    """Effective mTLS mode for ``workload`` (and its workload ``port``), composed the way istiod's
    ``ComposePeerAuthentication`` (``pilot/pkg/model/authentication.go``) does it: mesh (root namespace, no
    selector), then namespace (no selector), then workload (selector) policy; a set mode overrides the one
    before, UNSET inherits; nothing set means PERMISSIVE. Of several policies at one level the oldest wins in
    Istio; files carry no creation time, so the first by name wins here.

    ``portLevelMtls`` is read from the workload-level policy only ("These only apply when a workload selector
    is specified"); an UNSET port entry inherits the composed workload mode.
    """

    def first(scope: list[PeerAuthentication]) -> PeerAuthentication | None:
        return min(scope, key=lambda p: p.name) if scope else None

    mesh = first([p for p in policies if not p.selector and p.namespace == root_namespace])
    namespace = first([p for p in policies if not p.selector and p.namespace == workload.namespace])
    selected = first(
        [
            p
            for p in policies
            if p.selector
            and p.namespace == workload.namespace
            and selects(p.namespace, p.selector, workload, root_namespace=root_namespace)
        ]
    )
    mode = "PERMISSIVE"
    for p in (mesh, namespace, selected):
        if p is not None and p.mode != "UNSET":
            mode = p.mode
    if selected is not None and port is not None and port in selected.port_level:
        port_mode = selected.port_level[port]
        return mode if port_mode == "UNSET" else port_mode
    return mode


MAX_SERIES_PER_CONNECTION = 32  # metric series a connection keeps at hand (by authority, status and flags)

_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}  # the request's ``protocol`` attribute, made once

_OUTBOUND_REPLACED = frozenset({"x-request-id", XFCC_HEADER, *TRACE_HEADERS})


@dataclass(slots=True)
class _Generation:
    config: SidecarConfig
    router: Router
    clusters: ClusterManager
    inbound: Cluster | None
    inbound_mode: str
    paths: PathNormalizer
    xfcc: ClientCertForwarding


class Sidecar:
    """Build with a :class:`SidecarConfig` and an :class:`Authorizer`; ``await start()``; ``reload()``."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        authorizer: Authorizer | None = None,
        rng: random.Random | None = None,
        clock: Clock = monotonic_clock,
        metrics: ProxyMetrics | None = None,
        fast_path: bool = True,
    ) -> None:
        """``fast_path=False`` serves every inbound request through the general handler (the fast path's
        oracle in differential tests)."""
        self.authorizer: Authorizer = authorizer or AllowAll()
        self.fast_path = fast_path
        self.rng = rng or random.Random()
        self.clock = clock
        self.metrics = metrics or ProxyMetrics()
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._gen = self._compile(config)
        s = config.settings
        self.workload = Workload(namespace=s.namespace, labels=dict(s.labels))
        self.mirrorer = Mirrorer(
            s.mirror_concurrency,
            lambda route, result: self.metrics.mirror_requests.labels(route, result).inc(),
        )
        self.inbound: Listener | None = None
        self.outbound: Listener | None = None
        self.admin: Listener | None = None
        self._allow_all = isinstance(self.authorizer, AllowAll)  # mode none: no request to build, no check
        # An in-process authorizer decides a request whose token it has verified before without waiting:
        # no coroutine chain for the common case (the remote one always waits for its answer).
        self._check_now: Callable[[Request, Workload], Decision | None] | None = getattr(
            self.authorizer, "check_now", None
        )
        # The labelled children's bound ``inc``, looked up once (``labels()`` costs several µs per call).
        self._count_allow = self.metrics.authz.labels("allow").inc
        self._count_deny = self.metrics.authz.labels("deny").inc
        self._count_error = self.metrics.authz.labels("error").inc

    # -- configuration -------------------------------------------------------------------------------------
    def _load_identity(self, config: SidecarConfig) -> None:
        ident = config.settings.identity
        if ident is None:
            self._server_ctx = self._client_ctx = None
            return
        self._server_ctx = server_context(ident)
        self._client_ctx = client_context(ident)

    def _compile(self, config: SidecarConfig) -> _Generation:
        self._load_identity(config)
        s = config.settings
        clusters = ClusterManager(
            config.mesh,
            ssl_context=lambda: self._client_ctx,
            trust_domain=s.trust_domain,
            rng=self.rng,
            clock=self.clock,
        )
        inbound = None
        if s.app_port:
            inbound = Cluster(
                f"inbound|{s.app_port}||", [Endpoint(s.app_address, s.app_port)], TrafficPolicy(),
                ssl_context=lambda: None, rng=self.rng, clock=self.clock,
            )  # fmt: skip
        workload = Workload(namespace=s.namespace, labels=dict(s.labels))
        # The one inbound listener fronts the workload port ``appPort``: that is the port number
        # ``portLevelMtls`` keys name (the workload's port, not the Service's; PeerAuthentication docs).
        mode = peer_authentication_mode(
            config.mesh.peer_authentications,
            workload,
            root_namespace=s.root_namespace,
            port=s.app_port or None,
        )
        if mode in ("STRICT", "PERMISSIVE") and s.identity is None:
            mode = "DISABLE"  # no SVID: nothing to terminate mTLS with
        paths = PathNormalizer(s.path_normalization)
        own_uris = certificate_uris(Path(s.identity.cert).read_bytes()) if s.identity is not None else ()
        xfcc = ClientCertForwarding(s.client_cert, own_uris)
        return _Generation(config, Router(config.mesh), clusters, inbound, mode, paths, xfcc)

    @property
    def config(self) -> SidecarConfig:
        return self._gen.config

    def reload(self, config: SidecarConfig) -> None:
        """Swap in a new generation. Raises (keeping the old one) if it cannot be compiled."""
        if (
            config.settings.inbound != self.config.settings.inbound
            or config.settings.outbound != self.config.settings.outbound
        ):
            log.warning("listener addresses changed: restart the proxy to apply them")
        old = self._gen
        try:
            self._gen = self._compile(config)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._gen = old
            self._load_identity(old.config)
            self.metrics.reloads.labels("error").inc()
            raise AuthzError(f"cannot apply the new configuration: {exc}", reason="invalid_config") from exc
        self.metrics.reloads.labels("ok").inc()
        # Idle connections of the old generation are closed; in-flight ones finish and close on release.
        old.clusters.close()
        if old.inbound is not None:
            old.inbound.close()

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.config.settings
        if s.inbound is not None:
            self.inbound = Listener(
                self._handle_inbound,
                host=s.inbound.address,
                port=s.inbound.port,
                tls_mode=lambda: self._gen.inbound_mode,
                ssl_context=lambda: self._server_ctx,
                on_done=self._done_inbound,
                fast=self._serve_inbound_fast if self.fast_path else None,
                name="inbound",
            )
            await self.inbound.start()
        if s.outbound is not None:
            self.outbound = Listener(
                self._handle_outbound,
                host=s.outbound.address,
                port=s.outbound.port,
                on_done=self._done_outbound,
                name="outbound",
            )
            await self.outbound.start()
        if s.admin is not None:
            self.admin = Listener(self._handle_admin, host=s.admin.address, port=s.admin.port, name="admin")
            await self.admin.start()

    async def stop(self) -> None:
        for listener in (self.outbound, self.inbound, self.admin):
            if listener is not None:
                await listener.close()
        await self.mirrorer.close()
        self._gen.clusters.close()
        if self._gen.inbound is not None:
            self._gen.inbound.close()

    # -- inbound: authorize, then forward to the local app -------------------------------------------------
    async def _handle_inbound(
        self, req: ProxyRequest, conn: ConnectionInfo, info: StreamInfo
    ) -> ProxyResponse:
        gen = self._gen
        admitted = self._admit_inbound(gen, req, conn, info)
        if isinstance(admitted, Request):
            try:
                decision = await self.authorizer.check(admitted, self.workload)
            except Exception as exc:
                admitted = self._authorizer_failed(gen, info, exc)
            else:
                admitted = self._verdict(req, info, decision)
        if isinstance(admitted, ProxyResponse):
            return admitted
        if gen.inbound is None:
            info.flags.add("NR")
            return local_response(404, "no local application configured")
        info.route_name = "inbound"
        response = await gen.inbound.forward(req, info, retry=None, replayable=False)
        if admitted:
            response.headers.extend(admitted)
        return response

    def _serve_inbound_fast(self, head: RequestHead, down: Downstream) -> Awaitable[bool] | None:
        """The inbound path for a request without a body (most of them) in one coroutine, the listener's
        :data:`~authz.proxy.listener.FastPath`: the same steps as :meth:`_handle_inbound` with the upstream
        try of ``Cluster.forward`` started in place (``Cluster.begin_now``) when a pooled connection is idle,
        so the request costs no chain of coroutines. Declines (None) before any effect when there is no
        local app, for HEAD, and when the authorizer must be awaited: the general path serves those."""
        gen = self._gen
        if gen.inbound is None or head.method == "HEAD":
            return None
        req = down.request(head)
        info = StreamInfo(time.monotonic())
        try:
            admitted: ProxyResponse | Request | list[tuple[str, str]] = self._admit_inbound(
                gen, req, down.info, info
            )
        except Exception:  # as the listener does for a handler that raises
            log.exception("inbound: handler failed")
            admitted = local_response(500, "internal error")
        if isinstance(admitted, Request):
            return None  # nothing counted yet (check_now returned None): the general path awaits the check
        return self._exchange_inbound(gen.inbound, head, req, info, admitted=admitted, down=down)

    async def _exchange_inbound(
        self,
        cluster: Cluster,
        head: RequestHead,
        req: ProxyRequest,
        info: StreamInfo,
        *,
        admitted: ProxyResponse | list[tuple[str, str]],
        down: Downstream,
    ) -> bool:
        if isinstance(admitted, ProxyResponse):
            response = admitted
        else:
            # cluster.forward(req, info) without retries, its one try started in place when a pooled
            # connection is idle (Cluster.begin_now), awaited here: no coroutine below this one.
            try:
                info.route_name = "inbound"
                started = cluster.begin_now(req, info)
                if started is None:
                    response = await cluster.forward(req, info, retry=None, replayable=False)
                else:
                    upstream, pool = started
                    try:
                        while (response_head := upstream.poll_head()) is None:
                            await upstream.channel.wait()
                    except UpstreamError as exc:
                        pool.release(upstream)
                        if cluster.may_resend(req, exc):  # a stale pooled connection: resent once
                            response = await cluster.forward(
                                req, info, retry=None, replayable=False, resent=True
                            )
                        else:
                            response = cluster.failure_response(exc.failure, info)
                    except BaseException:
                        upstream.close()
                        pool.release(upstream)
                        raise
                    else:
                        response = cluster.response(response_head, req, upstream, pool)
            except Exception:  # as the listener does for a handler that raises
                log.exception("inbound: handler failed")
                response = local_response(500, "internal error")
            else:
                if admitted:
                    response.headers.extend(admitted)
        kept = down.respond_now(head, req, response, info)
        return kept if kept is not None else await down.respond(head, req, response, info)

    def _admit_inbound(
        self, gen: _Generation, req: ProxyRequest, conn: ConnectionInfo, info: StreamInfo
    ) -> ProxyResponse | Request | list[tuple[str, str]]:
        """An inbound request up to the authorizer's verdict, without waiting: the HCM's path normalization,
        ``x-forwarded-client-cert`` and ``x-request-id``, then the check when the authorizer can decide
        now. Returns the reply to send instead (a bad path, a deny), the headers an allow adds to the
        response (forward the request), or the authorization request when the authorizer must be awaited
        (then :meth:`_verdict`)."""
        try:  # the HCM normalizes before any filter: the authorizer and the app see the same path
            req.target = gen.paths.normalize(req.target)
        except MalformedRequest:
            return local_response(400, "")
        # x-forwarded-client-cert per forward_client_cert_details, before any filter sees the request
        req.headers = gen.xfcc.apply(req.headers, conn.peer.certificate if conn.tls else "")
        rid = self._request_id(req)
        info.request_id = rid
        if self._allow_all:
            self._count_allow()
            return []
        source, destination = self._peers(gen, conn)
        request = build_request(
            method=req.method,
            authority=req.authority,
            target=req.target,
            headers=req.headers,
            scheme=req.scheme,
            protocol=_PROTOCOLS.get(req.version) or f"HTTP/{req.version}",
            source=source,
            destination=destination,
            request_id=rid,
        )
        if self._check_now is None:
            return request
        try:
            decision = self._check_now(request, self.workload)
        except Exception as exc:
            return self._authorizer_failed(gen, info, exc)
        if decision is None:
            return request
        return self._verdict(req, info, decision)

    def _verdict(
        self, req: ProxyRequest, info: StreamInfo, decision: Decision
    ) -> ProxyResponse | list[tuple[str, str]]:
        """A deny's reply, or an allow's header changes applied to ``req`` (its response headers returned)."""
        if not decision.allowed:
            self._count_deny()
            info.flags.add("UAEX")
            return deny_response(decision)
        self._count_allow()
        ops = decision.headers
        if ops.set or ops.append or ops.remove or ops.response:
            req.headers, response_headers = apply_allow(ops, req.headers)
            return response_headers
        return []

    def _authorizer_failed(
        self, gen: _Generation, info: StreamInfo, exc: Exception
    ) -> ProxyResponse | list[tuple[str, str]]:
        """Fail closed unless told otherwise (Envoy ``failure_mode_allow``)."""
        log.warning("authorizer failed: %s", exc)
        self._count_error()
        s = gen.config.settings
        if s.authorizer.fail_open:
            return []
        info.flags.add("UAEX")
        error = error_decision("authorization service unavailable", s.authorizer.status_on_error)
        return deny_response(error)

    @staticmethod
    def _request_id(req: ProxyRequest) -> str:
        """Keep the client's ``x-request-id`` when it is one sane value, else set a fresh one."""
        headers = req.headers
        given = [v for k, v in headers if k == "x-request-id"]
        if not given:  # the usual case: add a fresh id, nothing to take out
            rid = request_id(None)
            req.headers = [*headers, ("x-request-id", rid)]
            return rid
        rid = request_id(",".join(given))
        if len(given) != 1 or rid != given[0]:
            req.headers = [(k, v) for k, v in headers if k != "x-request-id"]
            req.headers.append(("x-request-id", rid))
        return rid

    def _peers(self, gen: _Generation, conn: ConnectionInfo) -> tuple[Peer, Peer]:
        """Source and destination peers of a connection, built once per connection and generation."""
        cached = conn.cache.get("peers")
        if cached is not None and cached[0] is gen:
            return cached[1], cached[2]
        source = Peer(conn.peer_address, conn.peer_port, conn.peer.principal, conn.peer.certificate)
        spiffe_id = gen.config.settings.spiffe_id if conn.tls else ""
        destination = Peer(conn.local_address, conn.local_port, spiffe_id)
        conn.cache["peers"] = (gen, source, destination)
        return source, destination

    # -- outbound: route, fault, weighted pick, retries/timeouts, mirror ----------------------------------
    async def _handle_outbound(
        self, req: ProxyRequest, conn: ConnectionInfo, info: StreamInfo
    ) -> ProxyResponse:
        gen = self._gen
        try:  # Envoy's HCM normalizes before routing and forwards the normalized path (spec §1.8.7)
            req.target = gen.paths.normalize(req.target)
        except MalformedRequest:
            return local_response(400, "")
        rid = request_id(req.header("x-request-id"))
        info.request_id = rid
        joined: dict[str, str] = {}
        for k, v in req.headers:
            joined[k] = f"{joined[k]},{v}" if k in joined else v
        match = gen.router.route(req.authority, req.method, req.target, joined, scheme=req.scheme)
        if match is None:
            info.flags.add("NR")
            return local_response(404, "")
        route = match.route
        info.route_name = route.name or match.virtual_service
        if not route.destinations:  # redirect or directResponse (the loader allows nothing else)
            return self._local_reply(route, req)
        # Replaced below, or (x-forwarded-client-cert) removed: the outbound HCM keeps Envoy's default
        # forward_client_cert_details SANITIZE, and the app's connection is not mutual TLS anyway.
        req.headers = [(k, v) for k, v in req.headers if k not in _OUTBOUND_REPLACED]
        req.headers += [("x-request-id", rid), *child_trace_headers(joined)]
        fault = route.fault
        if fault is not None:  # client-side faults come before routing; timeouts/retries then don't apply
            if fault.delay is not None and self._roll(fault.delay_percent):
                info.flags.add("DI")
                await asyncio.sleep(fault.delay)
            if (fault.abort_status is not None or fault.abort_grpc) and self._roll(fault.abort_percent):
                info.flags.add("FI")
                if fault.abort_grpc:
                    code = str(GRPC_CODES[fault.abort_grpc])
                    return local_response(
                        200, b"", [("content-type", "application/grpc"), ("grpc-status", code)]
                    )
                assert fault.abort_status is not None
                return local_response(fault.abort_status, "fault filter abort")
        dest = pick_weighted(route.destinations, [d.weight for d in route.destinations], self.rng)
        key = ClusterKey(dest.host, dest.port, dest.subset)
        try:
            cluster = gen.clusters.get(key)
        except UnknownService as exc:
            info.flags.add("UH")
            return local_response(503, f"no healthy upstream: {exc}")
        original = (req.authority, req.target)
        req.headers = dest.headers.request.apply(route.headers.request.apply(req.headers))
        if route.rewrite_uri is not None:
            req.target = rewrite_target(req.target, route.rewrite_uri, match.prefix)
        if route.rewrite_authority is not None:
            req.authority = route.rewrite_authority
        replayable = req.body.empty
        if not replayable and (route.retries is not None or route.mirrors):
            replayable = await req.body.buffer(gen.config.settings.replay_buffer_bytes)
        primary_summary: asyncio.Future[ResponseSummary] | None = None
        if route.mirrors and replayable:
            primary_summary = self._mirror(gen, route, req, original, info)
        hash_key = req.header(cluster.lb.hash_header) if cluster.lb.hash_header else None
        forward = cluster.forward(
            req, info, retry=route.retries if replayable else None, replayable=replayable, hash_key=hash_key
        )
        try:
            if route.timeout is None:  # Istio's default: no route timeout (IST route.go Notimeout)
                response = await forward
            else:
                async with asyncio.timeout(route.timeout):
                    response = await forward
        except TimeoutError:
            info.flags.add("UT")
            response = local_response(504, "upstream request timeout")
        response.headers = dest.headers.response.apply(route.headers.response.apply(response.headers))
        if primary_summary is not None:
            self._summarize_primary(response, route, primary_summary)
        return response

    @staticmethod
    def _local_reply(route: HTTPRoute, req: ProxyRequest) -> ProxyResponse:
        """Envoy's router answers a redirect / direct response route itself: no cluster, no upstream host, no
        response flag; the route's response header operations apply (``finalizeResponseHeaders``)."""
        if route.redirect is not None:
            response = redirect_reply(
                route.redirect,
                scheme=req.scheme,
                authority=req.authority,
                target=req.target,
                # Envoy's connection manager keeps a client's x-forwarded-proto on a sidecar
                # (use_remote_address false) and sets the connection's scheme when there is none.
                forwarded_proto=req.header("x-forwarded-proto") or req.scheme,
            )
        else:
            assert route.direct_response is not None
            response = direct_reply(route.direct_response)
        if req.method == "HEAD" and not response.length:
            # Envoy's local reply to HEAD carries content-length only for a non-empty body (checked against
            # Envoy 1.40 in test_proxy_redirect_oracle.py)
            response.length, response.no_body = None, True
        response.headers = route.headers.response.apply(response.headers)
        return response

    def _roll(self, percent: float) -> bool:
        return percent > 0 and self.rng.random() * 100 < percent

    def _mirror(
        self,
        gen: _Generation,
        route: HTTPRoute,
        req: ProxyRequest,
        original: tuple[str, str],
        info: StreamInfo,
    ) -> asyncio.Future[ResponseSummary] | None:
        primary: asyncio.Future[ResponseSummary] | None = None
        route_name = info.route_name
        for m in route.mirrors:
            if not self._roll(m.percent):
                continue
            try:
                cluster = gen.clusters.get(ClusterKey(m.host, m.port, m.subset))
            except UnknownService:
                self.metrics.mirror_requests.labels(route_name, "no_cluster").inc()
                continue
            body = RequestBody(
                req.body.length, BytesBody(req.body.buffered or b"").read if not req.body.empty else None
            )
            if not req.body.empty:
                body.buffered = req.body.buffered
            copy = ProxyRequest(
                req.method,
                req.target,
                shadow_authority(req.authority),
                list(req.headers),
                body,
                req.scheme,
                req.version,
            )
            compare = None
            if route.compare_mirror is not None:
                if primary is None:
                    primary = asyncio.get_running_loop().create_future()
                compare = self._comparer(route_name, route.compare_mirror, primary)
            shadow_info = StreamInfo(start=time.monotonic())

            async def send(
                cluster: Cluster = cluster, copy: ProxyRequest = copy, si: StreamInfo = shadow_info
            ) -> ProxyResponse:
                return await cluster.forward(copy, si, retry=None, replayable=not copy.body.empty)

            self.mirrorer.submit(route_name, send, compare)
        return primary

    def _comparer(
        self, route_name: str, names: tuple[str, ...], primary: asyncio.Future[ResponseSummary]
    ) -> Callable[[ResponseSummary], Awaitable[None]]:
        async def compare(mirror: ResponseSummary) -> None:
            try:
                async with asyncio.timeout(60):
                    p = await asyncio.shield(primary)
            except (TimeoutError, asyncio.CancelledError):
                return
            m = summarize(mirror.status, list(mirror.headers), names, mirror.body_sha256)
            for fld, a, b in (
                ("status", p.status, m.status),
                ("headers", p.headers, m.headers),
                ("body", p.body_sha256, m.body_sha256),
            ):
                if a != b:
                    self.metrics.mirror_mismatches.labels(route_name, fld).inc()

        return compare

    def _summarize_primary(
        self, response: ProxyResponse, route: HTTPRoute, fut: asyncio.Future[ResponseSummary]
    ) -> None:
        hashing = HashingBody(response.body)
        response.body = hashing
        names = route.compare_mirror or ()
        status, headers = response.status, list(response.headers)

        def done(d: asyncio.Future[str]) -> None:
            if fut.done():
                return
            if d.cancelled():
                fut.cancel()
            else:
                fut.set_result(summarize(status, headers, names, d.result()))

        hashing.digest.add_done_callback(done)

    # -- telemetry -----------------------------------------------------------------------------------------
    def _record(self, reporter: str, req: ProxyRequest, conn: ConnectionInfo, info: StreamInfo) -> None:
        duration_ms = (time.monotonic() - info.start) * 1000
        flags = ",".join(sorted(info.flags)) if info.flags else "-"
        # The series by what varies per request, kept per connection (the rest of the labels are the
        # connection's): no nine-label tuple to build and hash for every request.
        per_connection = conn.cache.get(reporter)
        if per_connection is None:
            per_connection = conn.cache[reporter] = {}
        key = (req.authority, info.status, flags)
        series = per_connection.get(key)
        if series is None:
            namespace = self.workload.namespace
            source = reporter == "source"
            series = self.metrics.series(
                (
                    reporter,
                    namespace if source else "unknown",
                    conn.peer.principal or "unknown",
                    req.authority or "unknown",
                    "unknown" if source else namespace,
                    "http",
                    str(info.status or 0),
                    flags,
                    "unknown" if source else ("mutual_tls" if conn.tls else "none"),
                )
            )
            if len(per_connection) < MAX_SERIES_PER_CONNECTION:
                per_connection[key] = series
        series[0].inc()
        series[1].observe(duration_ms)
        if self.config.settings.access_log:
            access_log.info(
                access_log_line(
                    {
                        "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "method": req.method,
                        "path": req.target,
                        "protocol": f"HTTP/{req.version}",
                        "response_code": info.status,
                        "response_flags": flags,
                        "bytes_received": info.bytes_received,
                        "bytes_sent": info.bytes_sent,
                        "duration": round(duration_ms, 3),
                        "upstream_host": info.upstream_host or "-",
                        "upstream_cluster": info.upstream_cluster or "-",
                        "route_name": info.route_name or "-",
                        "x_request_id": info.request_id,
                        "authority": req.authority,
                        "downstream_remote_address": f"{conn.peer_address}:{conn.peer_port}",
                        "downstream_peer_principal": conn.peer.principal or "-",
                        "reporter": reporter,
                    }
                )
            )

    def _done_inbound(self, req: ProxyRequest, conn: ConnectionInfo, info: StreamInfo) -> None:
        self._record("destination", req, conn, info)

    def _done_outbound(self, req: ProxyRequest, conn: ConnectionInfo, info: StreamInfo) -> None:
        self._record("source", req, conn, info)

    # -- admin ---------------------------------------------------------------------------------------------
    async def _handle_admin(self, req: ProxyRequest, conn: ConnectionInfo, info: StreamInfo) -> ProxyResponse:
        path = req.target.partition("?")[0]
        if path == "/metrics":
            return local_response(
                200, generate_latest(self.metrics.registry), content_type="text/plain; version=0.0.4"
            )
        if path in ("/ready", "/healthz/ready"):
            return local_response(200, "LIVE\n")
        return local_response(404, "")

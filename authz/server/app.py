"""``authz serve``: one process serving gRPC ext_authz, HTTP ext_authz and the admin endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import uvicorn
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz.config import MeshConfig
from authz.decision import Decision
from authz.decision_log import DecisionLog
from authz.identity import PeerTrust
from authz.request import Request, Workload
from authz.runtime import AuthzRuntime
from authz.server.admin import build_admin_app
from authz.server.grpc_ext_authz import AuthorizationServicer, add_to_server
from authz.server.grpc_h2 import (
    GRPC_INVALID_ARGUMENT,
    GRPC_NOT_FOUND,
    GrpcH2Server,
    GrpcStatusError,
    serve_grpc_h2,
)
from authz.server.http_ext_authz import HttpCheckServer, HttpCheckSettings, TranslationMemo, serve_http

__all__ = [
    "CHECK_METHOD",
    "DEFAULT_ADMIN",
    "DEFAULT_GRPC",
    "DEFAULT_HTTP",
    "HEALTH_CHECK_METHOD",
    "GrpcServerKind",
    "ServeOptions",
    "Server",
    "parse_addr",
]

log = logging.getLogger("authz.server")

# Fixed, documented defaults on loopback. 9191 is the port the OPA-Envoy plugin and Envoy's examples use for
# a gRPC ext_authz server; HTTP mode and admin sit next to it.
DEFAULT_GRPC = "127.0.0.1:9191"
DEFAULT_HTTP = "127.0.0.1:9192"
DEFAULT_ADMIN = "127.0.0.1:9193"
GRPC_SERVICE = "envoy.service.auth.v3.Authorization"
CHECK_METHOD = f"/{GRPC_SERVICE}/Check"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
GrpcServerKind = Literal["h2", "grpcio"]
"""``h2``: :mod:`authz.server.grpc_h2` (unary Check and Health/Check, ~25 us per check behind Envoy);
``grpcio``: ``grpc.aio`` (also server reflection and Health/Watch, ~5x the CPU per check)."""
_SERVING: bytes = health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.SERVING
).SerializeToString()


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _AdminServer(uvicorn.Server):
    """uvicorn without its signal capture: the authorizer owns SIGINT/SIGTERM/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class ServeOptions:
    policies: list[Path]
    mesh: MeshConfig = field(default_factory=MeshConfig)
    grpc_addr: str | None = DEFAULT_GRPC
    http_addr: str | None = DEFAULT_HTTP
    admin_addr: str | None = DEFAULT_ADMIN
    default_workload: Workload = field(default_factory=Workload)
    http_settings: HttpCheckSettings = field(default_factory=HttpCheckSettings)
    decision_log: DecisionLog | None = None
    peer_trust: PeerTrust | None = None
    fail_open: bool = False
    watch: bool = True
    reuse_port: bool = False
    grpc_server: GrpcServerKind = "h2"


class Server:
    """Owns the runtime (engine + reload + key fetching) and every listener."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.runtime = AuthzRuntime(
            options.policies,
            options.mesh,
            default_workload=options.default_workload,
            decision_log=options.decision_log,
            peer_trust=options.peer_trust,
            fail_open=options.fail_open,
        )
        self.engine = self.runtime.engine
        self.reloader = self.runtime.reloader
        self.authenticator = self.runtime.authenticator
        self._grpc: grpc.aio.Server | None = None
        self._grpc_h2: GrpcH2Server | None = None
        self._http: HttpCheckServer | None = None
        self._admin: uvicorn.Server | None = None
        self._admin_task: asyncio.Task[Any] | None = None
        self._stop = asyncio.Event()
        self.ready = False
        self.grpc_port = 0
        self.http_port = 0
        self.admin_port = 0

    async def _check(self, request: Request) -> Decision:
        return await self.engine.check(request)

    def config_dump(self) -> dict[str, Any]:
        dump = self.runtime.config_dump()
        dump["listeners"] = {"grpc": self.grpc_port, "http": self.http_port, "admin": self.admin_port}
        return dump

    async def start(self) -> None:
        opts = self.options
        if opts.grpc_addr and opts.grpc_server == "h2":
            host, port = parse_addr(opts.grpc_addr)
            servicer = AuthorizationServicer(
                self._check, malformed=self.engine.malformed, check_now=self.engine.check_now
            )
            parse = external_auth_pb2.CheckRequest.FromString

            async def check(message: bytes) -> bytes:
                try:
                    request = parse(message)
                except Exception:  # protobuf DecodeError: not a CheckRequest at all
                    raise GrpcStatusError(GRPC_INVALID_ARGUMENT, "malformed CheckRequest") from None
                return await servicer.Check(request, None)

            self._grpc_h2 = await serve_grpc_h2(
                {CHECK_METHOD: check, HEALTH_CHECK_METHOD: _health_check},
                host,
                port,
                reuse_port=opts.reuse_port,
            )
            self.grpc_port = self._grpc_h2.sockets[0].getsockname()[1]
        elif opts.grpc_addr:
            host, port = parse_addr(opts.grpc_addr)
            server = grpc.aio.server(
                options=[
                    ("grpc.so_reuseport", 1 if opts.reuse_port else 0),
                    ("grpc.max_concurrent_streams", 1000),
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                ]
            )
            add_to_server(
                server,
                AuthorizationServicer(
                    self._check, malformed=self.engine.malformed, check_now=self.engine.check_now
                ),
            )
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            await health_servicer.set(GRPC_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            reflection.enable_server_reflection(
                (GRPC_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            self.grpc_port = server.add_insecure_port(f"{host}:{port}")
            if self.grpc_port == 0:
                raise OSError(f"cannot bind gRPC ext_authz on {opts.grpc_addr}")
            await server.start()
            self._grpc = server
        if opts.http_addr:
            host, port = parse_addr(opts.http_addr)
            self._http = await serve_http(
                self._check,
                host,
                port,
                settings=opts.http_settings,
                malformed=self.engine.malformed,
                reuse_port=opts.reuse_port,
                check_now=self.engine.check_now,  # answered from the parser callback when nothing waits
                # a check repeating an earlier one but for its request id skips translation
                memo=TranslationMemo(self.engine.ignorable_headers, self.engine.check_again),
            )
            self.http_port = self._http.sockets[0].getsockname()[1]
        if opts.admin_addr:
            await self._start_admin(opts.admin_addr)
        await self.runtime.start(watch=opts.watch)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.runtime.reload_soon)
        self.ready = True

    async def _start_admin(self, addr: str) -> None:
        host, port = parse_addr(addr)
        app = build_admin_app(
            ready=lambda: self.ready and self.runtime.issuers_settled(), config_dump=self.config_dump
        )
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        admin = _AdminServer(config)
        task = asyncio.create_task(admin.serve())
        for _ in range(500):  # bounded wait for the admin socket (uvicorn binds asynchronously)
            if admin.started or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done() or not admin.started:
            task.cancel()
            raise OSError(f"cannot bind admin on {addr}")
        self._admin, self._admin_task = admin, task
        servers = getattr(admin, "servers", [])
        if servers and servers[0].sockets:
            self.admin_port = servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.ready = False
        self._stop.set()
        if self._http is not None:
            await self._http.shutdown(grace=1.0)
        if self._grpc_h2 is not None:
            await self._grpc_h2.shutdown(grace=1.0)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._admin is not None and self._admin_task is not None:
            self._admin.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._admin_task, timeout=3)
        await self.runtime.stop()

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        log.info(
            "meshauthz serving: grpc=%s http=%s admin=%s",
            self.grpc_port or "-",
            self.http_port or "-",
            self.admin_port or "-",
        )
        await self._stop.wait()
        await self.stop()


async def _health_check(message: bytes) -> bytes:
    """``grpc.health.v1.Health/Check`` (grpc ``doc/health-checking.md``): SERVING for the server as a whole
    ("") and for the ext_authz service, NOT_FOUND for any other name."""
    try:
        service = health_pb2.HealthCheckRequest.FromString(message).service
    except Exception:  # protobuf DecodeError
        raise GrpcStatusError(GRPC_INVALID_ARGUMENT, "malformed HealthCheckRequest") from None
    if service not in ("", GRPC_SERVICE):
        raise GrpcStatusError(GRPC_NOT_FOUND, f"unknown service {service!r}")
    return _SERVING

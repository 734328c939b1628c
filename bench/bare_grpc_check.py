"""The gRPC ext_authz floor (row 3gb): a ``grpc.aio`` server answering every ``Check`` with OK.

No authorization logic at all: every ``envoy.service.auth.v3.Authorization/Check`` gets one prebuilt
``CheckResponse`` with ``status.code = OK`` (0) and an empty ``ok_response`` (envoy
``service/auth/v3/external_auth.proto``: a CheckResponse whose status is OK allows the request). Messages
come from ``xds-protos`` and the server options are those of ``authz serve`` (``authz/server/app.py``), on
uvloop when importable as ``authz serve`` runs (``authz/eventloop.py``), so the only difference from row
3gw1 is the authorizer's own work.

Run as a script (no imports from ``bench`` or ``authz``)::

    python bench/bare_grpc_check.py --port 0

It prints ``listening on 127.0.0.1:<port> (<loop>)`` once the server is started, then serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

__all__ = [
    "CHECK_METHOD",
    "SERVER_OPTIONS",
    "AllowAllServicer",
    "allow_response",
    "build_parser",
    "loop_name",
    "main",
    "run_loop",
    "serve",
]

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
# The options authz serve passes to grpc.aio.server (authz/server/app.py), one process: no SO_REUSEPORT.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]


def allow_response() -> Any:
    """``CheckResponse{status: {code: OK}, ok_response: {}}``."""
    response = external_auth_pb2.CheckResponse()
    response.status.CopyFrom(status_pb2.Status(code=code_pb2.OK))
    response.ok_response.SetInParent()
    return response


class AllowAllServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``Authorization/Check`` that allows everything, with one response object built once."""

    def __init__(self) -> None:
        self._allow = allow_response()

    async def Check(self, request: Any, context: Any) -> Any:
        return self._allow


async def serve(host: str, port: int, *, loop_name: str) -> None:
    """Start the server, print the ready line, serve until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AllowAllServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound} ({loop_name})", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=0.5)


def loop_name() -> str:
    """``uvloop`` when importable (what ``authz.eventloop.run`` picks), else ``asyncio``."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on the loop :func:`loop_name` names."""
    if loop_name() == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Bare gRPC ext_authz check server: OK to every Check.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_loop(serve(args.host, args.port, loop_name=loop_name()))
    except OSError as exc:
        print(f"bare_grpc_check: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

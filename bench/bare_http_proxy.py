"""The proxy floor (row 4p): a bare uvloop + ``httptools`` HTTP/1.1 forwarding proxy with no features.

Each downstream request is written to an idle keep-alive connection to one upstream (opened on demand,
kept in a pool), and the upstream's response is relayed back: headers as they came (less the hop-by-hop
and framing ones), the body re-framed with ``content-length``. No routing, policy, telemetry, header
rewriting, timeouts or retries: what any Python proxy on this stack pays for parsing two messages and
moving them across four socket operations. Requests with a body are not supported (the benchmark sends
``GET``); they are answered 501.

With ``--policies DIR`` (row 4pe) each request is also decided in-process by the project's engine
(``authz.runtime.AuthzRuntime``, the same one ``authz proxy`` runs) before it is forwarded: its headers are
decoded into a dict, the check is driven to its end in the callback (a cached token never waits), and a
deny is answered with its status instead of being forwarded. Nothing else of the bundled proxy is there
(no path normalization beyond the engine's, no request id, XFCC, metrics or header changes): it measures
what the engine adds to the floor, so row 4b's distance from it is the proxy's own data path.

Run as a script (no imports from ``bench``; ``authz`` only with ``--policies``)::

    python bench/bare_http_proxy.py --port 0 --upstream-port 8080 [--policies DIR --namespace NS --labels k=v]

It prints ``listening on 127.0.0.1:<port> (<loop>)`` once bound, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import httptools

__all__ = ["BareProxyProtocol", "UpstreamPool", "build_parser", "loop_name", "main", "run_loop", "serve"]

BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
NOT_IMPLEMENTED = b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n"
FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"
# Hop-by-hop (RFC 9110 §7.6.1) and framing headers: never relayed as they came.
_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te", b"upgrade"})
MAX_IDLE = 256  # idle upstream connections kept
MAX_QUEUED = 64  # pipelined requests waiting on one downstream connection


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply_to: BareProxyProtocol | None = None
        self.head: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.forget(self)
        if self.reply_to is not None:
            self.reply_to.answer(BAD_GATEWAY, keep_alive=False)
            self.reply_to = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def send(self, request: bytes, reply_to: BareProxyProtocol) -> None:
        assert self.transport is not None
        self.reply_to = reply_to
        self.head = []
        self.body = []
        self.transport.write(request)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _DROP:
            self.head.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        status = self.parser.get_status_code()
        response = b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\n\r\n%s" % (
            status,
            b"OK" if status == 200 else b"Status",
            b"".join(self.head),
            len(body),
            body,
        )
        reply_to, self.reply_to = self.reply_to, None
        if self.parser.should_keep_alive():
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.close()
        if reply_to is not None:
            reply_to.answer(response, keep_alive=True)


class UpstreamPool:
    """Idle keep-alive connections to one upstream; a new one is opened when none is idle."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[_Upstream] = []

    def forget(self, conn: _Upstream) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def release(self, conn: _Upstream) -> None:
        if len(self.idle) < MAX_IDLE and conn.transport is not None:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def send(self, request: bytes, reply_to: BareProxyProtocol) -> None:
        if self.idle:
            self.idle.pop().send(request, reply_to)
            return
        asyncio.get_running_loop().create_task(self._connect_and_send(request, reply_to))

    async def _connect_and_send(self, request: bytes, reply_to: BareProxyProtocol) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Upstream(self), self.host, self.port)
        except OSError:
            reply_to.answer(BAD_GATEWAY, keep_alive=True)
            return
        conn.send(request, reply_to)


class EngineCheck:
    """The in-process check of row 4pe: ``authz.runtime.AuthzRuntime`` over a policy folder (imported here
    only, so the floor without ``--policies`` stays free of the project's code)."""

    def __init__(self, policies: str, namespace: str, labels: dict[str, str]) -> None:
        from pathlib import Path

        from authz.request import HttpAttributes, Peer, Request, Workload
        from authz.runtime import AuthzRuntime

        self.runtime = AuthzRuntime([Path(policies)])
        self.workload = Workload(namespace=namespace, labels=labels)
        self._request = Request
        self._http = HttpAttributes
        self._peer = Peer

    def deny(self, method: str, host: str, path: str, headers: dict[str, str], peer: Any) -> bytes | None:
        """None to forward the request, else the response that denies it."""
        request = self._request(
            source=self._peer(address=peer[0], port=peer[1]),
            http=self._http(method=method, host=host, path=path, headers=headers, validated=True),
        )
        checking = self.runtime.check(request, self.workload)
        try:
            checking.send(None)
        except StopIteration as done:
            decision = done.value
        else:  # keys are being fetched: not a case this benchmark produces
            checking.close()
            return FORBIDDEN
        if decision.allowed:
            return None
        return b"HTTP/1.1 %d Denied\r\ncontent-length: 0\r\n\r\n" % decision.status


class BareProxyProtocol(asyncio.Protocol):
    """One downstream connection; requests are forwarded one at a time, in order."""

    def __init__(self, pool: UpstreamPool, check: EngineCheck | None = None) -> None:
        self.pool = pool
        self.check = check
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer: Any = ("", 0)
        self.url = b""
        self.head: list[bytes] = []
        self.fields: dict[str, str] = {}
        self.has_body = False
        # (request to forward, or the local answer to give; the client keeps the connection)
        self.queue: collections.deque[tuple[bytes, bytes | None, bool]] = collections.deque()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername") or ("", 0)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._close_with(BAD_REQUEST)

    def _close_with(self, raw: bytes) -> None:
        if self.transport is not None:
            self.transport.write(raw)
            self.transport.close()
            self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.head = []
        self.fields = {}
        self.has_body = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            self.has_body = self.has_body or value not in (b"0", b"")
        if lowered not in _DROP:
            self.head.append(b"%s: %s\r\n" % (name, value))
        if self.check is not None:
            key = lowered.decode("latin-1")
            text = value.decode("latin-1")
            prev = self.fields.get(key)
            self.fields[key] = text if prev is None else f"{prev},{text}"

    def on_message_complete(self) -> None:
        if self.has_body:
            self._close_with(NOT_IMPLEMENTED)
            return
        method = self.parser.get_method()
        request = b"%s %s HTTP/1.1\r\n%s\r\n" % (method, self.url, b"".join(self.head))
        if len(self.queue) >= MAX_QUEUED:
            self._close_with(BAD_REQUEST)
            return
        local = None
        if self.check is not None:
            fields = self.fields
            local = self.check.deny(
                method.decode("ascii"), fields.get("host", ""), self.url.decode("latin-1"), fields, self.peer
            )
        self.queue.append((request, local, self.parser.should_keep_alive()))
        if not self.busy:
            self._next()

    def _next(self) -> None:
        while self.queue and self.transport is not None and not self.busy:
            request, local, _ = self.queue[0]
            if local is None:
                self.busy = True
                self.pool.send(request, self)
                return
            self._deliver(local, keep_alive=True)  # a deny: answered here, in its turn

    def answer(self, response: bytes, *, keep_alive: bool) -> None:
        """The upstream's response (or our 502) for the request at the head of the queue."""
        self.busy = False
        self._deliver(response, keep_alive=keep_alive)
        self._next()

    def _deliver(self, response: bytes, *, keep_alive: bool) -> None:
        if not self.queue:
            return
        _, _, client_keeps = self.queue.popleft()
        if self.transport is None:
            return
        self.transport.write(response)
        if not (keep_alive and client_keeps):
            self.transport.close()
            self.transport = None


async def serve(
    host: str,
    port: int,
    upstream_host: str,
    upstream_port: int,
    *,
    loop_name: str,
    check: EngineCheck | None = None,
) -> None:
    """Bind, print the ready line, serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    pool = UpstreamPool(upstream_host, upstream_port)
    if check is not None:
        await check.runtime.start(watch=False)
    server = await loop.create_server(lambda: BareProxyProtocol(pool, check), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {host}:{bound} ({loop_name})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def loop_name() -> str:
    """``uvloop`` when importable (what ``authz.eventloop.run`` picks), else ``asyncio``."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    if loop_name() == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Bare HTTP/1.1 forwarding proxy: the floor of row 4.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    p.add_argument("--upstream-host", default="127.0.0.1", help="upstream address (127.0.0.1)")
    p.add_argument("--upstream-port", type=int, required=True, help="upstream port")
    p.add_argument("--policies", help="decide each request with the project's engine over this policy folder")
    p.add_argument("--namespace", default="default", help="the workload's namespace (with --policies)")
    p.add_argument("--labels", default="", help="the workload's labels, k=v,k=v (with --policies)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check = None
    if args.policies:
        labels = dict(item.split("=", 1) for item in args.labels.split(",") if item)
        check = EngineCheck(args.policies, args.namespace, labels)
        from authz.eventloop import tune_gc_for_serving

        tune_gc_for_serving()  # as `authz proxy` does once its startup objects exist
    try:
        run_loop(
            serve(
                args.host,
                args.port,
                args.upstream_host,
                args.upstream_port,
                loop_name=loop_name(),
                check=check,
            )
        )
    except OSError as exc:
        print(f"bare_http_proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

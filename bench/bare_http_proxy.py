"""The proxy floor (row 4p): a bare uvloop + ``httptools`` HTTP/1.1 forwarding proxy with no features.

Each downstream request is written to an idle keep-alive connection to one upstream (opened on demand,
kept in a pool), and the upstream's response is relayed back: headers as they came (less the hop-by-hop
and framing ones), the body re-framed with ``content-length``. No routing, policy, telemetry, header
rewriting, timeouts or retries: what any Python proxy on this stack pays for parsing two messages and
moving them across four socket operations. Requests with a body are not supported (the benchmark sends
``GET``); they are answered 501.

Run as a script (no imports from ``bench`` or ``authz``)::

    python bench/bare_http_proxy.py --port 0 --upstream-port 8080

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


class BareProxyProtocol(asyncio.Protocol):
    """One downstream connection; requests are forwarded one at a time, in order."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.head: list[bytes] = []
        self.has_body = False
        self.queue: collections.deque[tuple[bytes, bool]] = collections.deque()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

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
        self.has_body = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            self.has_body = self.has_body or value not in (b"0", b"")
        if lowered not in _DROP:
            self.head.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self) -> None:
        if self.has_body:
            self._close_with(NOT_IMPLEMENTED)
            return
        method = self.parser.get_method()
        request = b"%s %s HTTP/1.1\r\n%s\r\n" % (method, self.url, b"".join(self.head))
        if len(self.queue) >= MAX_QUEUED:
            self._close_with(BAD_REQUEST)
            return
        self.queue.append((request, self.parser.should_keep_alive()))
        if not self.busy:
            self._next()

    def _next(self) -> None:
        if self.queue and self.transport is not None:
            self.busy = True
            self.pool.send(self.queue[0][0], self)

    def answer(self, response: bytes, *, keep_alive: bool) -> None:
        """The upstream's response (or our 502) for the request at the head of the queue."""
        self.busy = False
        if not self.queue:
            return
        _, client_keeps = self.queue.popleft()
        if self.transport is None:
            return
        self.transport.write(response)
        if not (keep_alive and client_keeps):
            self.transport.close()
            self.transport = None
            return
        self._next()


async def serve(host: str, port: int, upstream_host: str, upstream_port: int, *, loop_name: str) -> None:
    """Bind, print the ready line, serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    pool = UpstreamPool(upstream_host, upstream_port)
    server = await loop.create_server(lambda: BareProxyProtocol(pool), host, port, backlog=1024)
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_loop(serve(args.host, args.port, args.upstream_host, args.upstream_port, loop_name=loop_name()))
    except OSError as exc:
        print(f"bare_http_proxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

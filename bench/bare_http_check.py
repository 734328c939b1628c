"""The HTTP ext_authz floor (row 3hb): an asyncio + httptools server that answers every check ``200``.

No authorization logic at all: it parses each HTTP/1.1 request Envoy's ``http_service`` sends (keep-alive,
one connection reused for many checks) and writes a fixed ``200 OK`` with an empty body, which Envoy's
ext_authz filter reads as "allowed" (envoy ``ext_authz`` HTTP service: any 200 response is OK). It runs on
uvloop when that is importable, as ``authz serve`` does (``authz/eventloop.py``), so the only difference
from row 3hw1 is the authorizer's own work.

With ``--read-headers`` (row 3ht) it also does the least a real check server must: decode every header
into a dict and look the ``authorization`` value up in a token cache (a first sight is cached as allowed;
nothing is verified), the "bare HTTP check server with a token cache" the benchmark issue quotes.

Run as a script (no imports from ``bench`` or ``authz``)::

    python bench/bare_http_check.py --port 0 [--read-headers]

It prints ``listening on 127.0.0.1:<port> (<loop>)`` once the socket is bound, then serves until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, ClassVar

import httptools

__all__ = [
    "ALLOW_RESPONSE",
    "BareHttpCheckProtocol",
    "HeaderReadingCheckProtocol",
    "build_parser",
    "loop_name",
    "main",
    "run_loop",
    "serve",
]

ALLOW_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
# The client asked to close (HTTP/1.0 without keep-alive, or "Connection: close"): say so and close.
ALLOW_AND_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class BareHttpCheckProtocol(asyncio.Protocol):
    """One connection: every complete request (pipelined ones too, in order) gets ``200 OK``."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self._transport is not None:
                self._transport.write(BAD_REQUEST)
                self._transport.close()
                self._transport = None

    # httptools callback (RFC 9112 §9.3: persistent unless the client said otherwise)
    def on_message_complete(self) -> None:
        if self._transport is None:
            return
        if self._parser.should_keep_alive():
            self._transport.write(ALLOW_RESPONSE)
        else:
            self._transport.write(ALLOW_AND_CLOSE)
            self._transport.close()
            self._transport = None


MAX_CACHED_TOKENS = 10_000


class HeaderReadingCheckProtocol(BareHttpCheckProtocol):
    """The floor plus reading the request: every header decoded into a dict (lower-case names, UTF-8
    values), the ``authorization`` value looked up in a bounded token cache."""

    tokens: ClassVar[dict[str, bool]] = {}  # shared by every connection of the process

    def __init__(self) -> None:
        super().__init__()
        self._headers: dict[str, str] = {}

    def on_message_begin(self) -> None:
        self._headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("ascii").lower()] = value.decode("utf-8", "replace")

    def on_message_complete(self) -> None:
        token = self._headers.get("authorization", "")
        tokens = HeaderReadingCheckProtocol.tokens
        if tokens.get(token) is None:
            if len(tokens) >= MAX_CACHED_TOKENS:
                tokens.clear()
            tokens[token] = True
        super().on_message_complete()


async def serve(host: str, port: int, *, loop_name: str, read_headers: bool = False) -> None:
    """Bind, print the ready line, serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    protocol = HeaderReadingCheckProtocol if read_headers else BareHttpCheckProtocol
    server = await loop.create_server(protocol, host, port, backlog=1024)
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
    """Run ``main`` on the loop :func:`loop_name` names."""
    if loop_name() == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Bare HTTP ext_authz check server: 200 to every request.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    p.add_argument(
        "--read-headers",
        action="store_true",
        help="decode every header and look the token up in a cache (row 3ht) instead of ignoring them",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_loop(serve(args.host, args.port, loop_name=loop_name(), read_headers=args.read_headers))
    except OSError as exc:
        print(f"bare_http_check: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

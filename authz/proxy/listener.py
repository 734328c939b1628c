"""Downstream listeners: accept, (m)TLS per PeerAuthentication mode, parse requests strictly, write responses.

One coroutine per connection over a :class:`~authz.proxy.channel.Channel` (a Protocol feeding the parser);
one request in flight per connection (pipelined requests wait in the parser's event queue, spec §3.2).
Bodies stream in both directions with back-pressure: the request body is consumed only when the upstream
side asks for the next chunk, and downstream writes wait in ``drain()`` above the high-water mark.

Hot-path choices (spec §2.3, §3.3): no timer per read (a sweeper fails reads whose deadline passed), a
response head and the body bytes already parsed go out in one ``write`` (one ``send`` syscall).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from authz.proxy.channel import Channel
from authz.proxy.http1 import (
    DROP_FROM_REQUEST,
    LAST_CHUNK,
    CodecError,
    RequestHead,
    RequestParser,
    encode_chunk,
    serialize_response_head,
    strip_hop_by_hop,
)
from authz.proxy.message import (
    ProxyRequest,
    ProxyResponse,
    RequestBody,
    StreamInfo,
    local_response,
    reason_phrase,
)
from authz.proxy.mtls import PeerIdentity, peer_identity
from authz.proxy.pool import UpstreamError

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "ConnectionInfo",
    "Downstream",
    "DownstreamClosed",
    "FastPath",
    "Handler",
    "Listener",
]

log = logging.getLogger("authz.proxy")

COALESCE_LIMIT = 64 * 1024  # body bytes already parsed that ride along with the response head in one write
DEFAULT_IDLE_TIMEOUT = 300.0  # keep-alive idle time between requests before we close
DEFAULT_HEADER_TIMEOUT = 60.0  # time to receive a request head or the next body chunk (slowloris bound)
TLS_DETECT_TIMEOUT = 10.0  # PERMISSIVE: time to wait for the first byte that tells TLS from plaintext
HANDSHAKE_TIMEOUT = 10.0
DRAIN_TIMEOUT = 5.0


class DownstreamClosed(Exception):
    """The client went away or sent a malformed body: the request is abandoned (response flag DC).

    ``error`` is set when the body was malformed; the client then gets its 400 before we close.
    """

    def __init__(self, message: str, error: CodecError | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    peer_address: str
    peer_port: int
    local_address: str
    local_port: int
    tls: bool = False
    peer: PeerIdentity = field(default_factory=PeerIdentity)
    cache: dict[str, Any] = field(default_factory=dict, compare=False)
    """Per-connection values a handler derives once (the peers it hands to the authorizer)."""


Handler = Callable[[ProxyRequest, ConnectionInfo, StreamInfo], Awaitable[ProxyResponse]]
Done = Callable[[ProxyRequest, ConnectionInfo, StreamInfo], None]
FastPath = Callable[[RequestHead, "Downstream"], Awaitable[bool] | None]
"""Serves a request without a body in one coroutine, or declines (None: :class:`Handler` serves it)."""


async def _wait_readable(sock: socket.socket, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: None if fut.done() else fut.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await fut
    finally:
        loop.remove_reader(sock.fileno())


class Listener:
    """An HTTP/1.1 listener. ``tls_mode()`` is read per connection: DISABLE, PERMISSIVE or STRICT."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_mode: Callable[[], str] = lambda: "DISABLE",
        ssl_context: Callable[[], ssl.SSLContext | None] = lambda: None,
        on_done: Done | None = None,
        fast: FastPath | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        name: str = "listener",
    ) -> None:
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.tls_mode = tls_mode
        self.ssl_context = ssl_context
        self.on_done = on_done
        self.fast = fast
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.name = name
        self.closing = False
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._channels: set[Channel] = set()

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.requested_port))
        sock.listen(512)
        sock.setblocking(False)
        self._sock = sock
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"{self.name}-accept")
        self._sweep_task = asyncio.create_task(self._sweep(), name=f"{self.name}-timeouts")

    async def _sweep(self) -> None:
        """Fail reads whose deadline passed: one timer for the listener instead of one per read."""
        loop = asyncio.get_running_loop()
        tick = max(0.01, min(1.0, self.idle_timeout / 4, self.header_timeout / 4))
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for channel in list(self._channels):
                channel.expire(now)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while not self.closing:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:
                if self.closing:
                    return
                log.warning("%s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.05)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve_socket(conn, addr))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve_socket(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        mode = self.tls_mode()
        use_tls = mode == "STRICT"
        channel = Channel(RequestParser())
        try:
            if mode == "PERMISSIVE":
                # Detect a TLS ClientHello (record type 0x16) without consuming it (Istio's tls_inspector).
                await _wait_readable(sock, TLS_DETECT_TIMEOUT)
                first = sock.recv(1, socket.MSG_PEEK)
                if not first:
                    sock.close()
                    return
                use_tls = first == b"\x16"
            ctx = self.ssl_context() if use_tls else None
            if use_tls and ctx is None:
                sock.close()
                return
            local = sock.getsockname()  # before the transport owns the socket
            transport, _ = await loop.connect_accepted_socket(
                lambda: channel, sock, ssl=ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ctx else None
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.debug("%s: connection setup failed: %s", self.name, exc)
            sock.close()
            return
        info = ConnectionInfo(
            peer_address=str(addr[0]),
            peer_port=int(addr[1]),
            local_address=str(local[0]),
            local_port=int(local[1]),
            tls=ctx is not None,
            peer=peer_identity(transport.get_extra_info("ssl_object")) if ctx is not None else PeerIdentity(),
        )
        conn = Downstream(self, channel, info)
        self._channels.add(channel)
        try:
            await conn.run()
        except Exception:
            log.exception("%s: connection failed", self.name)
        finally:
            self._channels.discard(channel)
            channel.abort() if conn.abort else channel.close()

    async def close(self, grace: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting; let requests in flight finish for up to ``grace`` seconds, then cut the rest."""
        self.closing = True
        for task in (self._accept_task, self._sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sock is not None:
            self._sock.close()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)


_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


def _frame(
    head: RequestHead, resp: ProxyResponse, stream: StreamInfo, keep: bool
) -> tuple[bytes, bool, bool, bool]:
    """The response head as we send it: (bytes, no body, chunked, keep-alive). Our own framing (RFC 9112
    §6): Content-Length when known, else chunked to an HTTP/1.1 client, else the end of the connection."""
    status = resp.status
    stream.status = status
    headers = [(k, v) for k, v in resp.headers if k not in _FRAMING]
    no_body = resp.no_body or head.method == "HEAD" or status in (204, 304) or 100 <= status < 200
    chunked = False
    length = resp.length
    if no_body:
        if length is not None and status != 204 and not 100 <= status < 200:
            headers.append(("content-length", str(length)))
    elif length is not None:
        headers.append(("content-length", str(length)))
    elif head.version == "1.1":
        headers.append(("transfer-encoding", "chunked"))
        chunked = True
    else:
        keep = False  # HTTP/1.0 client, unknown length: the end of the body is the end of the connection
    if not keep:
        headers.append(("connection", "close"))
    # Envoy writes its own reason phrase for the status, whatever the upstream's was (REASON_PHRASES).
    return serialize_response_head(status, reason_phrase(status), headers), no_body, chunked, keep


class Downstream:
    """One downstream connection: the loop reading requests, and what a :data:`FastPath` uses to answer
    (:meth:`request`, :meth:`respond`)."""

    def __init__(self, listener: Listener, channel: Channel, info: ConnectionInfo) -> None:
        self.listener = listener
        self.channel = channel
        self.info = info
        self.parser = channel.parser
        self.abort = False
        self._body_done = True
        self._continue_pending = False
        self._stream: StreamInfo | None = None
        self._idle = True
        self._loop = asyncio.get_running_loop()
        self._scheme = "https" if info.tls else "http"

    async def run(self) -> None:
        channel = self.channel
        listener = self.listener
        parser = self.parser
        events = parser.events
        while not listener.closing or not self._idle:
            channel.deadline = self._loop.time() + listener.idle_timeout
            try:
                while not events:
                    if parser.failed or channel.eof:
                        return
                    await channel.wait()
            except TimeoutError:
                return
            ev = channel.pop()
            if ev.kind == "error":
                assert ev.error is not None
                await self._write_error(ev.error)
                return
            if ev.kind != "head":
                return
            head = ev.head
            assert isinstance(head, RequestHead)
            self._idle = False
            if head.body == "none":
                self._body_done = True
                if events and events[0].kind == "end":
                    events.popleft()  # nothing to read: its end-of-message is queued right behind it
                fast = listener.fast
                serving = fast(head, self) if fast is not None else None
                keep = await (self._serve(head) if serving is None else serving)
            else:
                keep = await self._serve(head)
            self._idle = True
            if not keep:
                return

    async def _write_error(self, error: CodecError) -> None:
        resp = local_response(error.status, f"{error.message}\n")
        with contextlib.suppress(ConnectionError, OSError):
            self.channel.write(
                serialize_response_head(
                    resp.status,
                    resp.reason,
                    [*resp.headers, ("content-length", str(resp.length)), ("connection", "close")],
                )
                + error.message.encode()
                + b"\n"
            )
            await self.channel.drain()

    async def _read_body(self) -> bytes | None:
        if self._body_done:
            return None
        channel = self.channel
        if self._continue_pending:  # RFC 9110 §10.1.1: answer the expectation ourselves, as Envoy does
            self._continue_pending = False
            try:
                channel.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except ConnectionError as exc:
                self.abort = True
                raise DownstreamClosed("client closed") from exc
        channel.deadline = self._loop.time() + self.listener.header_timeout
        try:
            ev = await channel.next_event()
        except TimeoutError as exc:
            raise DownstreamClosed("request body timed out") from exc
        if ev is None or ev.kind in ("error", "head"):
            self.abort = ev is None
            raise DownstreamClosed(
                "client closed or sent a malformed body", ev.error if ev is not None else None
            )
        if ev.kind == "end":
            self._body_done = True
            return None
        if self._stream is not None:
            self._stream.bytes_received += len(ev.data)
        return ev.data

    def request(self, head: RequestHead) -> ProxyRequest:
        """The request as handlers see it: absolute-form resolved, hop-by-hop fields stripped."""
        authority = head.host
        target = head.target
        if not target.startswith("/") and target.startswith(("http://", "https://")):
            # absolute-form: its authority wins (RFC 9112 §3.2.2)
            parts = urlsplit(target)
            authority = parts.netloc
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body_kind = head.body
        if body_kind == "none":
            body = RequestBody(0, None)
        else:
            body = RequestBody(head.content_length if body_kind == "length" else None, self._read_body)
        return ProxyRequest(
            head.method,
            target,
            authority,
            strip_hop_by_hop(head.headers, DROP_FROM_REQUEST),
            body,
            self._scheme,
            head.version,
        )

    async def _serve(self, head: RequestHead) -> bool:
        if head.body == "none":
            self._body_done = True
        else:
            self._body_done = False
            self._continue_pending = head.expect_continue and head.version == "1.1"
        request = self.request(head)
        stream = StreamInfo(time.monotonic())
        self._stream = stream
        listener = self.listener
        try:
            response = await listener.handler(request, self.info, stream)
        except DownstreamClosed as exc:
            stream.flags.add("DC")
            if exc.error is not None:
                stream.status = exc.error.status
                await self._write_error(exc.error)
            self._done(request, stream)
            return False
        except Exception:
            log.exception("%s: handler failed", listener.name)
            response = local_response(500, "internal error")
        kept = self.respond_now(head, request, response, stream)
        return kept if kept is not None else await self.respond(head, request, response, stream)

    async def respond(
        self, head: RequestHead, request: ProxyRequest, response: ProxyResponse, stream: StreamInfo
    ) -> bool:
        """Write ``response`` to ``request``, then log and count it; returns whether to keep the connection
        open. A request body left unread (a deny before it was read) ends the connection, and the response
        says so (``connection: close``, as Envoy's HCM does for an incomplete request; RFC 9112 §9.3)."""
        keep = head.keep_alive and not self.listener.closing and self._body_done
        try:
            keep = await self._write_response(head, response, stream, keep)
        except (ConnectionError, OSError, DownstreamClosed):
            stream.flags.add("DC")
            response.body.abort()
            keep = False
        except UpstreamError:
            stream.flags.add("UPE")
            self.abort = True  # truncated upstream body: reset the client rather than end it cleanly
            keep = False
        self._done(request, stream)
        return keep and self._body_done  # the body may have ended unread only while streaming the response

    def _done(self, request: ProxyRequest, stream: StreamInfo) -> None:
        on_done = self.listener.on_done
        if on_done is not None:
            try:
                on_done(request, self.info, stream)
            except Exception:
                log.exception("access log / metrics failed")

    def respond_now(
        self, head: RequestHead, request: ProxyRequest, response: ProxyResponse, stream: StreamInfo
    ) -> bool | None:
        """:meth:`respond` when it needs no wait: a response whose whole body is here already (a local
        reply, a small upstream response) goes out in one write, and is logged and counted. None: nothing
        was done, await :meth:`respond`."""
        channel = self.channel
        if channel.write_paused or (response.length is None and not response.no_body):
            return None  # a body to stream, or a buffer to drain first
        data = response.body.take_all()
        if data is None:
            return None
        keep = head.keep_alive and not self.listener.closing and self._body_done
        out, no_body, _, keep = _frame(head, response, stream, keep)
        try:
            if no_body:
                channel.write(out)
            elif len(data) > (response.length or 0):
                stream.flags.add("UPE")  # as _write_response: a body longer than its Content-Length
                self.abort = True
                keep = False
            else:
                channel.write(out + data if data else out)
                stream.bytes_sent += len(data)
        except (ConnectionError, OSError):
            stream.flags.add("DC")
            keep = False
        self._done(request, stream)
        return keep

    async def _write_response(
        self, head: RequestHead, resp: ProxyResponse, stream: StreamInfo, keep: bool
    ) -> bool:
        out, no_body, chunked, keep = _frame(head, resp, stream, keep)
        length = resp.length
        channel = self.channel
        body = resp.body
        if no_body:
            channel.write(out)
            for _ in range(4):  # let the upstream connection see its end-of-message (bounded, none expected)
                if await body.read() is None:
                    break
            else:
                body.abort()
            await channel.drain()
            return keep
        # The body bytes already parsed go out with the head: one send for a small response.
        sent = 0
        pieces = [out]
        ended = False
        while sent < COALESCE_LIMIT:
            chunk = body.poll()
            if chunk is None:
                ended = True
                break
            if not chunk:
                break
            sent += len(chunk)
            if length is not None and sent > length:
                raise UpstreamError("reset", "upstream body longer than its Content-Length")
            pieces.append(encode_chunk(chunk) if chunked else chunk)
        if ended and chunked:
            pieces.append(LAST_CHUNK)
        channel.write(b"".join(pieces) if len(pieces) > 1 else out)
        if not ended:
            await channel.drain()
            while (chunk := await body.read()) is not None:
                if not chunk:
                    continue
                sent += len(chunk)
                if length is not None and sent > length:
                    raise UpstreamError("reset", "upstream body longer than its Content-Length")
                channel.write(encode_chunk(chunk) if chunked else chunk)
                await channel.drain()
            if chunked:
                channel.write(LAST_CHUNK)
        stream.bytes_sent += sent
        await channel.drain()
        return keep

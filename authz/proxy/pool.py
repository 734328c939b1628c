"""Upstream connections and keep-alive pools: ``pool -> connection``, each one request in flight at a time.

A connection writes one request (re-framed: our own Content-Length or chunked, RFC 9112 §6.3) and reads one
response with the strict parser. Pitfalls handled (spec ``proxy.md`` §3.1):

* 1xx responses are dropped while we wait for the final one (we answered ``Expect`` ourselves);
* a HEAD response ends at its headers and the connection is closed, not pooled: llhttp cannot be told the
  request was HEAD and would wait for ``Content-Length`` bytes (MagicStack/httptools#47);
* EOF before any response byte on a fresh TLS connection is a connect failure (a TLS 1.3 client certificate
  rejection shows up only there, spec §3.5).

Pools keep idle connections LIFO per endpoint and share a per-cluster circuit breaker (DR ``connectionPool``):
over ``maxConnections`` a request waits; more than ``http1MaxPendingRequests`` waiting => overflow (503 UO).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Awaitable, Callable

from authz.proxy.channel import Channel
from authz.proxy.http1 import (
    LAST_CHUNK,
    CodecError,
    Event,
    ResponseHead,
    ResponseParser,
    encode_chunk,
)
from authz.proxy.lb import Endpoint
from authz.proxy.model import ConnectionPoolSettings
from authz.proxy.mtls import spiffe_id_of
from authz.proxy.origination import Origination
from authz.proxy.retry import Failure

__all__ = [
    "CircuitBreaker",
    "EndpointPool",
    "Overflow",
    "UpstreamBody",
    "UpstreamConnection",
    "UpstreamError",
    "connect",
]


class UpstreamError(Exception):
    """A try failed without a usable response; ``failure`` is the retry condition it maps to."""

    def __init__(self, failure: Failure, message: str, *, sent_nothing: bool = False) -> None:
        super().__init__(message)
        self.failure: Failure = failure
        self.sent_nothing = sent_nothing


class Overflow(UpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__("overflow", message)


class UpstreamConnection:
    """One HTTP/1.1 connection to an endpoint, over a :class:`~authz.proxy.channel.Channel`."""

    def __init__(self, channel: Channel, endpoint: Endpoint, *, tls: bool) -> None:
        self.channel = channel
        self.endpoint = endpoint
        self.tls = tls
        self.requests = 0
        self.last_used = time.monotonic()
        self.reusable = True
        self._head_request = False
        self._close_delimited = False
        self._done = False
        self._fresh = True
        self._received_any = False
        self.peer_principal = ""

    @property
    def closed(self) -> bool:
        return self.channel.closed

    def close(self) -> None:
        self.reusable = False
        self.channel.abort()

    def begin(
        self,
        method: str,
        target: str,
        authority: str,
        headers: list[tuple[str, str]],
        *,
        length: int | None,
        body: bool,
    ) -> None:
        """Write the request head (re-framed: our own Content-Length, or chunked when ``body`` has no
        length). Raises :class:`UpstreamError`."""
        self._fresh = self.requests == 0
        self.requests += 1
        self._head_request = method == "HEAD"
        self._done = False
        self._received_any = False
        if body and length is None:
            framing = "transfer-encoding: chunked\r\n"
        elif length or method in ("POST", "PUT", "PATCH"):
            framing = f"content-length: {length or 0}\r\n"
        else:
            framing = ""
        try:
            self.channel.write(
                (
                    f"{method} {target} HTTP/1.1\r\nhost: {authority}\r\n"
                    + "".join([f"{k}: {v}\r\n" for k, v in headers])
                    + framing
                    + "\r\n"
                ).encode("latin-1")
            )
        except (ConnectionError, OSError) as exc:
            self.close()
            raise UpstreamError("reset", f"upstream connection failed: {exc}") from exc

    async def send_body(self, read_body: Callable[[], Awaitable[bytes | None]], length: int | None) -> None:
        """Stream the request body after :meth:`begin` (chunked when ``length`` is None), with
        back-pressure. Raises :class:`UpstreamError`."""
        channel = self.channel
        try:
            await channel.drain()
            sent = 0
            while (chunk := await read_body()) is not None:
                if not chunk:
                    continue
                sent += len(chunk)
                channel.write(encode_chunk(chunk) if length is None else chunk)
                await channel.drain()
            if length is None:
                channel.write(LAST_CHUNK)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            self.close()
            raise UpstreamError("reset", f"upstream connection failed: {exc}") from exc
        if length is not None and sent != length:
            self.close()
            raise UpstreamError("reset", "request body shorter than its Content-Length")

    def poll_head(self) -> ResponseHead | None:
        """The final response head if it has arrived, None while more bytes are needed (wait on the
        channel, then poll again). 1xx responses are dropped (spec §3.1 (3): we answered ``Expect``
        ourselves). Raises :class:`UpstreamError`."""
        channel = self.channel
        parser = channel.parser
        events = parser.events
        try:
            while events:
                event = events[0]
                if event.kind == "error":
                    assert event.error is not None
                    raise event.error
                head = event.head
                if event.kind != "head" or not isinstance(head, ResponseHead):
                    self.close()
                    raise UpstreamError("reset", "unexpected data before the response head")
                if 100 <= head.status < 200:
                    if len(events) < 2:
                        break  # its end-of-message is still to come
                    channel.pop()
                    self._received_any = True
                    if channel.pop().kind != "end":
                        self.close()
                        raise UpstreamError("reset", "malformed 1xx response")
                    continue
                channel.pop()
                self._received_any = True
                self._close_delimited = head.body == "close"
                if not head.keep_alive or self._close_delimited:
                    self.reusable = False
                if self._head_request:  # spec §3.1 (2)
                    self.reusable = False
                    self._done = True
                return head
            if parser.failed:
                raise CodecError("parser failed")
            if channel.eof:
                self.close()
                if self._fresh and self.tls and not self._received_any:
                    raise UpstreamError("connect_failure", "TLS peer closed before responding")
                raise UpstreamError(
                    "reset", "upstream closed before responding", sent_nothing=not self._fresh
                )
            return None
        except CodecError as exc:
            self.close()
            raise UpstreamError("reset", f"invalid upstream response: {exc}") from exc

    async def send(
        self,
        method: str,
        target: str,
        authority: str,
        headers: list[tuple[str, str]],
        *,
        length: int | None,
        read_body: Callable[[], Awaitable[bytes | None]] | None,
    ) -> ResponseHead:
        """Write the request and wait for the final response head. Raises :class:`UpstreamError`."""
        self.begin(method, target, authority, headers, length=length, body=read_body is not None)
        if read_body is not None:
            await self.send_body(read_body, length)
        channel = self.channel
        while (head := self.poll_head()) is None:
            await channel.wait()
        return head

    async def _next_event(self) -> Event:
        ev = await self.channel.next_event()
        if ev is None:
            if self.channel.parser.failed:
                raise CodecError("parser failed")
            raise EOFError
        if ev.kind == "error":
            assert ev.error is not None
            raise ev.error
        return ev

    def poll_body(self) -> bytes | None:
        """The next body chunk if already parsed, ``b""`` if not yet (or on trouble: :meth:`read_body` then
        reports it), None at the end."""
        if self._done:
            return None
        events = self.channel.parser.events
        if not events:
            return b""
        kind = events[0].kind
        if kind == "body":
            return events.popleft().data
        if kind == "end":
            events.popleft()
            self._done = True
            return None
        return b""

    def take_rest(self) -> bytes | None:
        """The rest of the body when its end has been parsed already (then done), else None."""
        if self._done:
            return b""
        pieces: list[bytes] = []
        for event in self.channel.parser.events:
            if event.kind == "end":
                break
            if event.kind != "body":
                return None
            pieces.append(event.data)
        else:
            return None
        pop = self.channel.pop
        for _ in range(len(pieces) + 1):
            pop()
        self._done = True
        return b"".join(pieces) if len(pieces) != 1 else pieces[0]

    async def read_body(self) -> bytes | None:
        """Next decoded chunk of the response body, None at its end. Raises UpstreamError on truncation."""
        if self._done:
            return None
        try:
            ev = await self._next_event()
        except EOFError as exc:
            if self._close_delimited:
                self._done = True
                self.reusable = False
                return None
            self.close()
            raise UpstreamError("reset", "upstream closed in the middle of the body") from exc
        except (ConnectionError, OSError, CodecError) as exc:
            self.close()
            raise UpstreamError("reset", f"upstream body failed: {exc}") from exc
        if ev.kind == "end":
            self._done = True
            return None
        return ev.data


async def connect(
    endpoint: Endpoint,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    expected_ids: tuple[str, ...] = (),
    origination: Origination | None = None,
) -> UpstreamConnection:
    """Open a connection (mTLS when ``ssl_context``); check the server's SPIFFE ID is ``expected_ids``.

    With ``origination`` (DR SIMPLE/MUTUAL) its context, SNI and SAN checks are used instead of the mesh's.
    """
    loop = asyncio.get_running_loop()
    channel = Channel(ResponseParser())
    if origination is not None:
        ssl_context = origination.context
        server_hostname: str | None = origination.server_hostname
    else:
        server_hostname = endpoint.address if ssl_context is not None else None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: channel,
                endpoint.address,
                endpoint.port,
                ssl=ssl_context,
                server_hostname=server_hostname,
            )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise UpstreamError("connect_failure", f"connect to {endpoint.key} failed: {exc}") from exc
    conn = UpstreamConnection(channel, endpoint, tls=ssl_context is not None)
    if origination is not None:
        ssl_object = transport.get_extra_info("ssl_object")
        problem = origination.problem(ssl_object.getpeercert() if ssl_object is not None else None)
        if problem:
            conn.close()
            raise UpstreamError("connect_failure", problem)
    elif ssl_context is not None:
        ssl_object = transport.get_extra_info("ssl_object")
        principal = spiffe_id_of(ssl_object.getpeercert() if ssl_object is not None else None)
        if not principal or (expected_ids and principal not in expected_ids):
            conn.close()
            raise UpstreamError(
                "connect_failure", f"upstream identity {principal or '(none)'} is not expected"
            )
        conn.peer_principal = principal
    return conn


class CircuitBreaker:
    """Per-cluster counters for DR ``connectionPool`` limits (Envoy circuit breakers, per worker here)."""

    def __init__(self, settings: ConnectionPoolSettings) -> None:
        self.settings = settings
        self.connections = 0
        self.pending = 0
        self.requests = 0


class EndpointPool:
    """Keep-alive connections to one endpoint."""

    def __init__(
        self,
        endpoint: Endpoint,
        breaker: CircuitBreaker,
        *,
        ssl_context: Callable[[], ssl.SSLContext | None],
        expected_ids: tuple[str, ...] = (),
        origination: Origination | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.breaker = breaker
        self._ssl_context = ssl_context
        self._expected_ids = expected_ids
        self._origination = origination
        self._idle: list[UpstreamConnection] = []
        self._closed = False
        self._waiters: collections.deque[asyncio.Future[UpstreamConnection | None]] = collections.deque()
        self.active = 0

    def _take_idle(self) -> UpstreamConnection | None:
        limit = self.breaker.settings.idle_timeout
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # LIFO: the warmest connection
            if conn.closed or now - conn.last_used > limit:
                conn.close()
                self.breaker.connections -= 1
                continue
            return conn
        return None

    def acquire_now(self) -> UpstreamConnection | None:
        """:meth:`acquire` when it needs no wait: an idle connection within the limits, else None.
        Raises :class:`Overflow`."""
        b = self.breaker
        if b.requests >= b.settings.max_requests:
            raise Overflow("too many active requests")
        conn = self._take_idle()
        if conn is not None:
            b.requests += 1
            self.active += 1
        return conn

    async def acquire(self) -> UpstreamConnection:
        """A connection for one request; waits when at ``maxConnections``; raises :class:`Overflow`."""
        conn = self.acquire_now()
        if conn is not None:
            return conn
        b = self.breaker
        if b.connections >= b.settings.max_connections:
            if b.pending >= b.settings.max_pending_requests:
                raise Overflow("too many pending requests")
            fut: asyncio.Future[UpstreamConnection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            b.pending += 1
            try:
                conn = await fut
            finally:
                b.pending -= 1
                if not fut.done():
                    fut.cancel()
                if fut in self._waiters:
                    self._waiters.remove(fut)
        if conn is None:
            b.connections += 1
            try:
                conn = await connect(
                    self.endpoint,
                    timeout=b.settings.connect_timeout,
                    ssl_context=self._ssl_context() if self.endpoint.tls else None,
                    expected_ids=self._expected_ids,
                    origination=self._origination,
                )
            except BaseException:
                b.connections -= 1
                self._wake(None)
                raise
        b.requests += 1
        self.active += 1
        return conn

    def _wake(self, conn: UpstreamConnection | None) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def release(self, conn: UpstreamConnection) -> None:
        """Return ``conn`` after its response ended (or failed); pooled only if it is still clean."""
        self.breaker.requests -= 1
        self.active -= 1
        per_conn = self.breaker.settings.max_requests_per_connection
        if per_conn and conn.requests >= per_conn:
            conn.reusable = False
        if conn.reusable and not conn.closed and not self._closed:
            conn.last_used = time.monotonic()
            if not self._wake(conn):
                self._idle.append(conn)
            return
        conn.close()
        self.breaker.connections -= 1
        self._wake(None)  # a waiter may open a connection in its place

    def close(self) -> None:
        """Close idle connections now; connections in use are closed when released (config reload)."""
        self._closed = True
        for conn in self._idle:
            conn.close()
            self.breaker.connections -= 1
        self._idle.clear()


class UpstreamBody:
    """An upstream response body; releases its connection to the pool at the end, closes it on abort."""

    def __init__(
        self, conn: UpstreamConnection, pool: EndpointPool, on_end: Callable[[bool], None] | None = None
    ) -> None:
        self._conn: UpstreamConnection | None = conn
        self._pool = pool
        self._on_end = on_end

    async def read(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            return None
        try:
            data = await conn.read_body()
        except UpstreamError:
            self._finish(ok=False)
            raise
        if data is None:
            self._finish(ok=True)
        return data

    def poll(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            return None
        data = conn.poll_body()
        if data is None:
            self._finish(ok=True)
        return data

    def take_all(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            return b""
        data = conn.take_rest()
        if data is not None:
            self._finish(ok=True)
        return data

    def _finish(self, *, ok: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not ok:
            conn.close()
        self._pool.release(conn)
        if self._on_end is not None:
            self._on_end(ok)

    def abort(self) -> None:
        self._finish(ok=False)

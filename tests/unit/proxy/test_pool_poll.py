"""The fast path's no-wait steps with in-memory transports: ``UpstreamConnection.poll_head`` / ``take_rest``
(and ``UpstreamBody.take_all``) over bytes fed to a :class:`Channel`, and ``Downstream.respond_now``
writing a whole response in one write, or declining (None) with nothing done."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.proxy.channel import Channel
from authz.proxy.http1 import RequestParser, ResponseHead, ResponseParser
from authz.proxy.lb import Endpoint
from authz.proxy.listener import ConnectionInfo, Downstream, Listener
from authz.proxy.message import BytesBody, ProxyRequest, ProxyResponse, RequestBody, StreamInfo
from authz.proxy.model import ConnectionPoolSettings
from authz.proxy.pool import CircuitBreaker, EndpointPool, UpstreamBody, UpstreamConnection, UpstreamError


class MemoryTransport(asyncio.Transport):
    """Records writes; closing and aborting only mark it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


ENDPOINT = Endpoint("127.0.0.1", 8080)


def upstream(*, tls: bool = False) -> tuple[UpstreamConnection, MemoryTransport]:
    channel = Channel(ResponseParser())
    transport = MemoryTransport()
    channel.connection_made(transport)
    return UpstreamConnection(channel, ENDPOINT, tls=tls), transport


def begin(conn: UpstreamConnection, method: str = "GET") -> None:
    conn.begin(method, "/x", "app", [("x-request-id", "1")], length=0, body=False)


def head_of(conn: UpstreamConnection) -> ResponseHead:
    head = conn.poll_head()
    assert head is not None
    return head


# -- poll_head -------------------------------------------------------------------------------------------


async def test_begin_writes_the_request_head_in_one_write() -> None:
    conn, transport = upstream()
    begin(conn)
    assert transport.writes == [b"GET /x HTTP/1.1\r\nhost: app\r\nx-request-id: 1\r\n\r\n"]


async def test_poll_head_waits_for_the_whole_head() -> None:
    conn, _ = upstream()
    begin(conn)
    assert conn.poll_head() is None
    conn.channel.data_received(b"HTTP/1.1 200 OK\r\ncontent-le")
    assert conn.poll_head() is None
    conn.channel.data_received(b"ngth: 2\r\n\r\nok")
    head = head_of(conn)
    assert (head.status, head.content_length) == (200, 2)
    assert conn.reusable


async def test_poll_head_drops_1xx_heads_even_split_from_their_end() -> None:
    conn, _ = upstream()
    begin(conn)
    conn.channel.data_received(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n")
    assert conn.poll_head() is None
    conn.channel.data_received(b"\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert head_of(conn).status == 204


@pytest.mark.parametrize(
    ("reused", "tls", "failure", "sent_nothing"),
    [
        (True, False, "reset", True),  # a pooled connection the server had closed: resend once
        (False, False, "reset", False),  # a fresh one: the server saw the request
        (False, True, "connect_failure", False),  # TLS 1.3 client certificate rejected (spec §3.5)
        (True, True, "reset", True),
    ],
)
async def test_poll_head_at_eof_before_any_byte(
    reused: bool, tls: bool, failure: str, sent_nothing: bool
) -> None:
    conn, transport = upstream(tls=tls)
    if reused:
        begin(conn)
        conn.channel.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        head_of(conn)
        assert conn.take_rest() == b""
    begin(conn)
    conn.channel.eof_received()
    with pytest.raises(UpstreamError) as caught:
        conn.poll_head()
    assert (caught.value.failure, caught.value.sent_nothing) == (failure, sent_nothing)
    assert transport.aborted and not conn.reusable


async def test_poll_head_after_a_1xx_then_eof_is_not_a_stale_connection() -> None:
    conn, _ = upstream(tls=True)
    begin(conn)
    conn.channel.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert conn.poll_head() is None
    conn.channel.eof_received()
    with pytest.raises(UpstreamError) as caught:
        conn.poll_head()
    assert (caught.value.failure, caught.value.sent_nothing) == ("reset", False)


async def test_poll_head_rejects_garbage() -> None:
    conn, transport = upstream()
    begin(conn)
    conn.channel.data_received(b"SMTP ready\r\n\r\n")
    with pytest.raises(UpstreamError) as caught:
        conn.poll_head()
    assert caught.value.failure == "reset" and not caught.value.sent_nothing
    assert transport.aborted


@pytest.mark.parametrize(
    ("method", "response", "reusable"),
    [
        ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", True),
        ("GET", b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", False),
        ("GET", b"HTTP/1.1 200 OK\r\n\r\n", False),  # close-delimited body
        ("GET", b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", False),
        ("HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", False),  # spec §3.1 (2)
    ],
)
async def test_poll_head_decides_whether_the_connection_goes_back(
    method: str, response: bytes, reusable: bool
) -> None:
    conn, _ = upstream()
    begin(conn, method)
    conn.channel.data_received(response)
    head_of(conn)
    assert conn.reusable is reusable


# -- take_rest / take_all --------------------------------------------------------------------------------


async def test_take_rest_takes_nothing_until_the_end_is_parsed() -> None:
    conn, _ = upstream()
    begin(conn)
    conn.channel.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    head_of(conn)
    queued = len(conn.channel.parser.events)
    assert conn.take_rest() is None
    assert len(conn.channel.parser.events) == queued  # nothing consumed
    conn.channel.data_received(b"2\r\nde\r\n0\r\n\r\n")
    assert conn.take_rest() == b"abcde"
    assert not conn.channel.parser.events
    assert conn.take_rest() == b""  # done: the rest of nothing


async def test_take_all_releases_the_connection_to_the_pool() -> None:
    pool = EndpointPool(ENDPOINT, CircuitBreaker(ConnectionPoolSettings()), ssl_context=lambda: None)
    conn, _ = upstream()
    pool.breaker.connections = 1
    pool.breaker.requests = pool.active = 1  # as acquire leaves it
    begin(conn)
    conn.channel.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel")
    head_of(conn)
    body = UpstreamBody(conn, pool)
    assert body.take_all() is None
    assert pool.active == 1
    conn.channel.data_received(b"lo")
    assert body.take_all() == b"hello"
    assert (pool.active, pool.breaker.requests) == (0, 0)
    assert pool.acquire_now() is conn  # pooled again, idle
    assert body.take_all() == b""  # finished: nothing more, released once


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=300),
    chunked=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_poll_head_and_take_rest_are_blind_to_how_bytes_arrive(
    body: bytes, chunked: bool, cuts: list[int]
) -> None:
    """Whatever the split of the response into reads, the head and the whole body come out the same once
    everything arrived, and ``take_rest`` never hands out part of a body."""
    if chunked:
        framed = b"".join(
            b"%x\r\n%b\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
        )
        wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"
    else:
        wire = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
    bounds = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})

    async def run() -> tuple[int, bytes | None]:
        conn, _ = upstream()
        begin(conn)
        head: ResponseHead | None = None
        rest: bytes | None = None
        for start, end in itertools.pairwise(bounds):
            conn.channel.data_received(wire[start:end])
            if head is None:
                head = conn.poll_head()
            if head is not None and rest is None:
                rest = conn.take_rest()
                assert rest is None or rest == body
        assert head is not None
        return head.status, rest

    assert asyncio.run(run()) == (200, body)


# -- respond_now -----------------------------------------------------------------------------------------


def downstream(*, on_done: Any = None) -> tuple[Downstream, MemoryTransport]:
    async def handler(*_: object) -> ProxyResponse:
        raise AssertionError("not called")

    listener = Listener(handler, on_done=on_done)
    channel = Channel(RequestParser())
    transport = MemoryTransport()
    channel.connection_made(transport)
    return Downstream(listener, channel, ConnectionInfo("127.0.0.1", 5000, "127.0.0.1", 15006)), transport


def parsed_head(raw: bytes) -> Any:
    parser = RequestParser()
    parser.feed(raw)
    return parser.events[0].head


GET = b"GET /x HTTP/1.1\r\nhost: web\r\n\r\n"


def req() -> ProxyRequest:
    return ProxyRequest("GET", "/x", "web", [], RequestBody(0, None))


async def test_respond_now_writes_head_and_body_in_one_write_and_counts_once() -> None:
    done: list[StreamInfo] = []
    down, transport = downstream(on_done=lambda _r, _c, info: done.append(info))
    stream = StreamInfo(0.0)
    response = ProxyResponse(200, "OK", [("x-a", "1")], BytesBody(b"hello"), length=5)
    assert down.respond_now(parsed_head(GET), req(), response, stream) is True
    assert transport.writes == [b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\n\r\nhello"]
    assert done == [stream] and (stream.status, stream.bytes_sent) == (200, 5)


async def test_respond_now_announces_close_to_a_client_that_asked_for_it() -> None:
    down, transport = downstream()
    head = parsed_head(b"GET /x HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
    response = ProxyResponse(200, "OK", [], BytesBody(b""), length=0)
    assert down.respond_now(head, req(), response, StreamInfo(0.0)) is False
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"]


async def test_respond_now_to_head_writes_no_body() -> None:
    down, transport = downstream()
    head = parsed_head(b"HEAD /x HTTP/1.1\r\nhost: web\r\n\r\n")
    response = ProxyResponse(200, "OK", [], BytesBody(b""), length=12, no_body=True)
    assert down.respond_now(head, req(), response, StreamInfo(0.0)) is True
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"]


class PartialBody:
    """A body whose end has not arrived: ``take_all`` declines (a ResponseBody of its own: the listener's
    classes may be compiled, and a compiled class cannot be subclassed here)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self) -> bytes | None:
        data, self.data = self.data, b""
        return data or None

    def poll(self) -> bytes | None:
        return b""

    def take_all(self) -> bytes | None:
        return None

    def abort(self) -> None:
        self.data = b""


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProxyResponse(200, "OK", [], BytesBody(b"abc"), length=None),  # a body to stream (chunked)
        lambda: ProxyResponse(200, "OK", [], PartialBody(b"ab"), length=3),  # not all here yet
    ],
    ids=["unknown-length", "partial-body"],
)
async def test_respond_now_declines_with_nothing_done(make: Any) -> None:
    done: list[StreamInfo] = []
    down, transport = downstream(on_done=lambda _r, _c, info: done.append(info))
    stream = StreamInfo(0.0)
    assert down.respond_now(parsed_head(GET), req(), make(), stream) is None
    assert transport.writes == [] and done == [] and stream.status == 0


async def test_respond_now_declines_while_the_client_is_not_reading() -> None:
    down, transport = downstream()
    down.channel.pause_writing()
    response = ProxyResponse(200, "OK", [], BytesBody(b"abc"), length=3)
    assert down.respond_now(parsed_head(GET), req(), response, StreamInfo(0.0)) is None
    assert transport.writes == []


async def test_respond_now_resets_the_client_on_a_body_longer_than_its_length() -> None:
    down, transport = downstream()
    stream = StreamInfo(0.0)
    response = ProxyResponse(200, "OK", [], BytesBody(b"abcdef"), length=3)
    assert down.respond_now(parsed_head(GET), req(), response, stream) is False
    assert transport.writes == [] and down.abort and stream.flags == {"UPE"}


async def test_respond_now_closes_when_the_request_body_is_still_unread() -> None:
    down, transport = downstream()
    down._body_done = False  # a deny answered before the client's body was read (RFC 9112 §9.3)
    response = ProxyResponse(403, "Forbidden", [], BytesBody(b"no"), length=2)
    assert down.respond_now(parsed_head(GET), req(), response, StreamInfo(0.0)) is False
    ((written,),) = [transport.writes]
    assert written.startswith(b"HTTP/1.1 403 Forbidden\r\n") and written.endswith(b"\r\n\r\nno")
    assert b"\r\nconnection: close\r\n" in written  # the client learns the connection ends here


async def test_respond_now_on_a_gone_client_is_dc() -> None:
    down, transport = downstream()
    transport.closing = True
    stream = StreamInfo(0.0)
    response = ProxyResponse(200, "OK", [], BytesBody(b"abc"), length=3)
    assert down.respond_now(parsed_head(GET), req(), response, stream) is False
    assert stream.flags == {"DC"}

"""The HTTP ext_authz front over a real socket: parsing, trusted headers, limits, keep-alive."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.decision import Decision, HeaderOps
from authz.errors import MalformedRequest
from authz.metrics import REGISTRY
from authz.request import Request
from authz.server.http_ext_authz import HttpCheckSettings, serve_http


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Decision:
        self.seen.append(request)
        assert request.http is not None
        if request.http.path.startswith("/ok"):
            return Decision(
                allowed=True,
                status=200,
                reason="allowed",
                decision_id="i1",
                headers=HeaderOps(set=(("x-user", "a"),), remove=("authorization", "x-t")),
            )
        return Decision(allowed=False, status=403, reason="denied_by_policy", decision_id="i2")


def malformed(exc: MalformedRequest) -> Decision:
    return Decision(allowed=False, status=400, reason=exc.reason, message=exc.message)


async def roundtrip(raw: bytes, settings_: HttpCheckSettings | None = None) -> tuple[bytes, Recorder]:
    rec = Recorder()
    server = await serve_http(
        rec, "127.0.0.1", 0, settings=settings_ or HttpCheckSettings(), malformed=malformed
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        data = b""
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=0.5)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        writer.close()
        return data, rec
    finally:
        await server.shutdown(grace=5)  # also waits until every server-side socket is closed


async def test_allow_carries_headers_and_removal_list() -> None:
    raw = b"GET /ok/1?x=y HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer t\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    data, rec = await roundtrip(raw)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x-user: a\r\n" in data
    assert b"x-envoy-auth-headers-to-remove: authorization,x-t\r\n" in data
    req = rec.seen[0]
    assert req.http is not None
    assert req.http.path == "/ok/1?x=y"
    assert req.http.host == "orders"
    assert req.http.headers["x-a"] == "1,2"
    assert req.http.headers[":method"] == "GET"


async def test_keep_alive_answers_requests_in_order() -> None:
    raw = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /no HTTP/1.1\r\nHost: a\r\n\r\n"
    data, rec = await roundtrip(raw)
    assert data.index(b"200 OK") < data.index(b"403 Forbidden")
    assert [r.http.path for r in rec.seen if r.http] == ["/ok", "/no"]


async def test_trusted_headers_need_the_envoy_marker() -> None:
    raw = (
        b"GET /ok HTTP/1.1\r\nHost: a\r\nx-authz-source-principal: +spiffe://td/ns/a/sa/b\r\n"
        b"x-authz-namespace: forged\r\nx-authz-source-address: +10.1.2.3:4444\r\n\r\n"
    )
    _, rec = await roundtrip(raw)
    req = rec.seen[0]
    assert req.source.principal == "spiffe://td/ns/a/sa/b"
    assert (req.source.address, req.source.port) == ("10.1.2.3", 4444)
    assert "namespace" not in req.context_extensions  # unmarked: the client's own copy, dropped
    assert req.http is not None and "x-authz-namespace" not in req.http.headers


async def test_trusted_headers_ignored_when_trust_is_off() -> None:
    raw = b"GET /ok HTTP/1.1\r\nHost: a\r\nx-authz-source-principal: +spiffe://td/ns/a/sa/b\r\n\r\n"
    _, rec = await roundtrip(raw, HttpCheckSettings(trust_envoy_headers=False))
    assert rec.seen[0].source.principal == ""


async def test_path_prefix_is_stripped() -> None:
    _, rec = await roundtrip(
        b"GET /check/ok/x HTTP/1.1\r\nHost: a\r\n\r\n", HttpCheckSettings(path_prefix="/check")
    )
    assert rec.seen[0].http is not None and rec.seen[0].http.path == "/ok/x"


async def test_oversized_headers_are_a_400_deny_not_a_crash() -> None:
    raw = (
        b"GET /ok HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"x-%d: %s\r\n" % (i, b"v" * 1000) for i in range(120))
        + b"\r\n"
    )
    data, rec = await roundtrip(raw)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert rec.seen == []


async def test_non_utf8_header_is_400() -> None:
    data, _ = await roundtrip(b"GET /ok HTTP/1.1\r\nHost: a\r\nX-B: \xff\xfe\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")


async def test_garbage_is_400_and_closed() -> None:
    data, rec = await roundtrip(b"\x00\x01 NOT HTTP\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")
    assert rec.seen == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_allow(data: bytes) -> None:
    """No byte string makes the front answer 200 for a path it was not asked to allow, or crash."""
    out, rec = asyncio.run(roundtrip(b"GET /no HTTP/1.1\r\nHost: a\r\n" + data))
    assert b"200 OK" not in out or any(r.http is not None and r.http.path.startswith("/ok") for r in rec.seen)


@pytest.mark.parametrize("te", [b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"])
async def test_smuggling_shape_is_rejected(te: bytes) -> None:
    data, _ = await roundtrip(b"POST /ok HTTP/1.1\r\nHost: a\r\n" + te + b"\r\n0\r\n\r\n")
    assert b"200 OK" not in data


class SlowRecorder(Recorder):
    """Waits before deciding (a key fetch): the front must hand the check to a task and still answer."""

    async def __call__(self, request: Request) -> Decision:
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)  # a Future
        return await super().__call__(request)


async def test_checks_that_wait_are_answered_in_order() -> None:
    rec = SlowRecorder()
    server = await serve_http(rec, "127.0.0.1", 0, settings=HttpCheckSettings(), malformed=malformed)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /no HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        data = b""
        while data.count(b"HTTP/1.1 ") < 2:
            data += await asyncio.wait_for(reader.read(65536), timeout=5)
        writer.close()
    finally:
        await server.shutdown(grace=5)  # also waits until every server-side socket is closed
    assert data.index(b"200 OK") < data.index(b"403 Forbidden")


async def test_connection_facts_follow_the_headers_of_each_request() -> None:
    # Facts derived from the trusted headers are shared between equal header sets: each request must
    # still get the facts of its own headers, and the connection's own address when Envoy sent none.
    def check(principal: bytes, namespace: bytes) -> bytes:
        return (
            b"GET /ok HTTP/1.1\r\nHost: a\r\nx-authz-source-principal: +" + principal + b"\r\n"
            b"x-authz-destination-address: +10.0.0.2:8080\r\nx-authz-namespace: +" + namespace + b"\r\n"
            b"x-authz-peer-certificate: +%2D%2D%2D\r\n\r\n"
        )

    a, b = b"spiffe://td/ns/a/sa/x", b"spiffe://td/ns/b/sa/y"
    raw = check(a, b"one") + check(b, b"two") + check(a, b"one")
    _, first = await roundtrip(raw)
    _, second = await roundtrip(check(a, b"one"))
    seen = first.seen + second.seen
    assert [(r.source.principal, r.context_extensions["namespace"]) for r in seen] == [
        (a.decode(), "one"),
        (b.decode(), "two"),
        (a.decode(), "one"),
        (a.decode(), "one"),
    ]
    assert {(r.destination.address, r.destination.port, r.source.certificate) for r in seen} == {
        ("10.0.0.2", 8080, "---")
    }
    # No x-authz-source-address: the source is the connection's peer, so two connections differ.
    assert seen[0].source.port == seen[2].source.port != seen[3].source.port
    assert all(r.source.address == "127.0.0.1" and r.source.port > 0 for r in seen)


# -- stopping -------------------------------------------------------------------------------------------
async def _read_until_eof(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout=5)
        if not chunk:
            return data
        data += chunk


async def test_shutdown_closes_idle_connections_and_answers_checks_in_flight_with_close() -> None:
    rec = SlowRecorder()
    server = await serve_http(rec, "127.0.0.1", 0, settings=HttpCheckSettings(), malformed=malformed)
    port = server.sockets[0].getsockname()[1]
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    part_reader, part_writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        idle_writer.write(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += await asyncio.wait_for(idle_reader.read(65536), timeout=5)
        assert first.startswith(b"HTTP/1.1 200 OK") and b"connection: close" not in first
        busy_writer.write(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")  # SlowRecorder: still deciding
        part_writer.write(b"GET /ok HTTP/1.1\r\nHost: a\r\n")  # half a request
        await asyncio.sleep(0.002)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stopping = asyncio.ensure_future(server.shutdown(grace=5))
        assert await _read_until_eof(idle_reader) == b""  # idle: closed at once, nothing sent
        assert loop.time() - started < 1.0  # not by the end of the grace period
        busy = await _read_until_eof(busy_reader)
        assert busy.startswith(b"HTTP/1.1 200 OK") and b"connection: close\r\n" in busy, busy
        part_writer.write(b"\r\n")  # the rest of the request read before the stop
        part = await _read_until_eof(part_reader)
        assert part.startswith(b"HTTP/1.1 200 OK") and b"connection: close\r\n" in part
        await asyncio.wait_for(stopping, 5)
        assert loop.time() - started < 2.0  # done when the last check was answered, not at the grace end
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        for w in (idle_writer, busy_writer, part_writer):
            w.close()


# -- what one message may make us hold ---------------------------------------------------------------------
async def _send_until_refused(port: int, pieces: list[bytes]) -> tuple[bytes, int]:
    """Send ``pieces`` one by one, looking for an answer after each; stop at the first answer, reset or
    close. Returns (what was read, how many pieces were sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer, sent = b"", 0
    try:
        for piece in pieces:
            try:
                writer.write(piece)
                await writer.drain()
            except ConnectionError:
                break
            sent += 1
            try:
                answer = await asyncio.wait_for(reader.read(4096), timeout=0.02)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            break  # an answer, or b"" (closed)
        return answer, sent
    finally:
        writer.close()


async def test_a_header_too_large_to_hold_is_refused_431_before_it_ends() -> None:
    """The server stops reading a message that outgrows what one check may hold: the client sees the 431
    (or 413 for a body), or at least the connection refused, long before it sent everything."""
    from authz.server.http_ext_authz import MAX_MESSAGE_BYTES

    server = await serve_http(Recorder(), "127.0.0.1", 0, settings=HttpCheckSettings(), malformed=malformed)
    port = server.sockets[0].getsockname()[1]
    chunk = 65536
    many = MAX_MESSAGE_BYTES // chunk + 40
    try:
        head = [b"GET /ok HTTP/1.1\r\nHost: a\r\nx-huge: "] + [b"a" * chunk] * many
        answer, sent = await _send_until_refused(port, [*head, b"\r\n\r\n"])
        assert sent < many, "the whole oversized header was accepted"
        assert answer.startswith(b"HTTP/1.1 431 ") or answer == b"", answer[:80]
        body_head = [b"POST /ok HTTP/1.1\r\nHost: a\r\ncontent-length: %d\r\n\r\n" % (many * chunk)]
        answer, sent = await _send_until_refused(port, body_head + [b"b" * chunk] * many)
        assert sent < many, "the whole oversized body was accepted"
        assert answer.startswith(b"HTTP/1.1 413 ") or answer == b"", answer[:80]
    finally:
        await server.shutdown(grace=1)


async def test_the_per_message_bound_restarts_with_each_message() -> None:
    """Many small pipelined checks, far more bytes in all than one message may hold, are all answered."""
    from authz.server.http_ext_authz import MAX_MESSAGE_BYTES

    rec = Recorder()
    server = await serve_http(rec, "127.0.0.1", 0, settings=HttpCheckSettings(), malformed=malformed)
    port = server.sockets[0].getsockname()[1]
    request = b"GET /ok HTTP/1.1\r\nHost: a\r\nx-pad: " + b"p" * 4000 + b"\r\n\r\n"
    count = MAX_MESSAGE_BYTES // len(request) + 50
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request * count)
        await writer.drain()
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < count:
            chunk = await asyncio.wait_for(reader.read(1 << 20), timeout=10)
            assert chunk, data[-200:]
            data += chunk
        assert b"431" not in data and b"413" not in data
        writer.close()
    finally:
        await server.shutdown(grace=1)


# -- check_now: checks decided without waiting are answered from the parser callback ---------------------


class NowRecorder(SlowRecorder):
    """Decides at once (``check_now``) unless the path starts with ``/wait``: those wait (a key fetch)."""

    def __init__(self) -> None:
        super().__init__()
        self.now: list[str] = []

    def check_now(self, request: Request) -> Decision | None:
        assert request.http is not None
        if request.http.path.startswith("/wait"):
            return None
        if request.http.path.startswith("/boom"):
            raise RuntimeError("bug")
        self.now.append(request.http.path)
        path = request.http.path
        return Decision(
            allowed=path.startswith("/ok"), status=200 if path.startswith("/ok") else 403, reason="r"
        )

    async def __call__(self, request: Request) -> Decision:
        assert request.http is not None
        self.seen.append(request)
        await asyncio.sleep(0.01)  # a Future
        path = request.http.path.removeprefix("/wait")
        return Decision(
            allowed=path.startswith("/ok"), status=200 if path.startswith("/ok") else 403, reason="r"
        )


async def _exchange(rec: NowRecorder, raw: bytes, answers: int, *, now: bool = True) -> bytes:
    server = await serve_http(
        rec,
        "127.0.0.1",
        0,
        settings=HttpCheckSettings(),
        malformed=malformed,
        check_now=rec.check_now if now else None,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        data = b""
        while data.count(b"HTTP/1.1 ") < answers:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=5)
            if not chunk:
                break
            data += chunk
        writer.close()
    finally:
        await server.shutdown(grace=5)
    return data


async def test_check_now_answers_without_the_waiting_checker_and_identically() -> None:
    raw = (
        b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /no HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: \xff\r\n\r\n"
    )
    rec = NowRecorder()
    answered_now = await _exchange(rec, raw, 3)
    assert rec.now == ["/ok", "/no"] and rec.seen == []  # no coroutine was needed
    waiting = NowRecorder()
    answered_later = await _exchange(waiting, raw, 3, now=False)
    assert [r.http.path for r in waiting.seen if r.http] == ["/ok", "/no"] and waiting.now == []
    assert answered_now == answered_later  # the same bytes either way
    assert answered_now.index(b"200 OK") < answered_now.index(b"403 Forbidden")
    assert answered_now.index(b"403 Forbidden") < answered_now.index(b"400 Bad Request")


async def test_a_check_that_must_wait_keeps_later_answers_behind_it() -> None:
    # /wait-ok must wait; /no could be decided at once but must not overtake it (RFC 9112 §9.3.2).
    rec = NowRecorder()
    raw = (
        b"GET /wait/ok HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /no HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /wait/no HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    data = await _exchange(rec, raw, 3)
    assert [r.http.path for r in rec.seen if r.http] == ["/wait/ok", "/no", "/wait/no"]
    assert rec.now == []  # while one waits, the rest queue behind it and go through the checker
    assert data.index(b"200 OK") < data.index(b"403 Forbidden")
    assert data.count(b"403 Forbidden") == 2


async def test_check_now_failing_is_an_internal_error_deny_and_the_connection_goes_on() -> None:
    rec = NowRecorder()
    before = _internal_errors()
    data = await _exchange(
        rec, b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\nGET /ok HTTP/1.1\r\nHost: a\r\n\r\n", 2
    )
    assert data.index(b"403 Forbidden") < data.index(b"200 OK")
    assert b"internal_error" in data
    assert _internal_errors() == before + 1


def _internal_errors() -> float:
    return REGISTRY.get_sample_value("meshauthz_internal_errors_total", {"front": "http"}) or 0.0

"""The h2c unary gRPC front over a real loopback socket, with the ``h2`` package (and ``grpc``) as client."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from authz.server import grpc_h2
from authz.server.grpc_h2 import DEFAULT_LIMITS, GrpcStatusError, H2Limits, serve_grpc_h2

ECHO = "/test.Svc/Echo"
SLOW = "/test.Svc/Slow"
FAIL = "/test.Svc/Fail"
CRASH = "/test.Svc/Crash"
GATED = "/test.Svc/Gated"
STEP_TIMEOUT = 5.0

# Small windows so that a few hundred calls cross them many times.
SMALL = H2Limits(
    max_message_bytes=64 * 1024,
    initial_window_size=65535,
    connection_window_size=160 * 1024,
)


def grpc_frame(message: bytes, flag: int = 0) -> bytes:
    return bytes((flag,)) + len(message).to_bytes(4, "big") + message


class Methods:
    """Test methods: echo (eager), slow echo (awaits), status error, crash, gated (waits for a release)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = asyncio.Event()

    async def echo(self, message: bytes) -> bytes:
        self.calls.append(ECHO)
        return message

    async def slow(self, message: bytes) -> bytes:
        self.calls.append(SLOW)
        await asyncio.sleep(0.001)
        return message[::-1]

    async def fail(self, message: bytes) -> bytes:
        self.calls.append(FAIL)
        raise GrpcStatusError(7, "denied: 100% é\n" + message.decode())

    async def crash(self, message: bytes) -> bytes:
        self.calls.append(CRASH)
        raise RuntimeError("boom")

    async def gated(self, message: bytes) -> bytes:
        self.calls.append(GATED)
        await self.gate.wait()
        return message

    def table(self) -> dict[str, grpc_h2.UnaryMethod]:
        return {ECHO: self.echo, SLOW: self.slow, FAIL: self.fail, CRASH: self.crash, GATED: self.gated}


@dataclass
class Reply:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int:
        # Trailers-Only: grpc-status rides in the (only) header block.
        src = self.trailers or self.headers
        return int(src[b"grpc-status"].decode())

    @property
    def message(self) -> bytes:
        assert self.data[:1] == b"\x00"
        assert int.from_bytes(self.data[1:5], "big") == len(self.data) - 5
        return self.data[5:]

    @property
    def grpc_message(self) -> str:
        src = self.trailers or self.headers
        return unquote_to_bytes(src.get(b"grpc-message", b"").decode()).decode()


class H2Client:
    """An asyncio client driving ``h2.connection.H2Connection`` over a socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.replies: dict[int, Reply] = {}
        self.window_updates: dict[str, int] = {"connection": 0, "stream": 0}
        self.pings: list[bytes] = []
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.eof = False

    @classmethod
    async def open(cls, port: int, settings: dict[h2.settings.SettingCodes, int] | None = None) -> H2Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        if settings:
            conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        conn.initiate_connection()
        client = cls(reader, writer, conn)
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def pump(self, until: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> None:
        """Read and handle events until ``until()`` holds (or EOF); bounded by ``timeout``."""
        async with asyncio.timeout(timeout):
            while not until() and not self.eof:
                chunk = await self.reader.read(65536)
                if not chunk:
                    self.eof = True
                    return
                for event in self.conn.receive_data(chunk):
                    self.handle(event)
                self.flush()

    def handle(self, event: Any) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.replies[event.stream_id].headers = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            self.replies[event.stream_id].data += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.replies[event.stream_id].trailers = dict(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self.replies[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.replies[event.stream_id].reset = int(event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            self.window_updates["stream" if event.stream_id else "connection"] += 1
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings.append(event.ping_data)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event

    def start(self, path: str, *, extra: list[tuple[bytes, bytes]] | None = None, end: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.replies[sid] = Reply()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *(extra or []),
        ]
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return int(sid)

    async def send(self, sid: int, data: bytes, *, end: bool, chunk: int = 1 << 20, pad: int = 0) -> None:
        """Send ``data`` in frames of at most ``chunk`` bytes, waiting for window when it runs out."""
        view = memoryview(data)
        while view:
            room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size) - (
                pad + 1 if pad else 0
            )
            if room <= 0:
                before: int = self.conn.local_flow_control_window(sid)

                def grew(b: int = before) -> bool:
                    return bool(self.conn.local_flow_control_window(sid) > b)

                await self.pump(grew)
                continue
            n = min(room, chunk, len(view))
            last = n == len(view)
            self.conn.send_data(sid, view[:n].tobytes(), end_stream=end and last, pad_length=pad or None)
            self.flush()
            view = view[n:]
        if end and not data:
            self.conn.end_stream(sid)
            self.flush()

    async def call(self, path: str, message: bytes, **kw: Any) -> Reply:
        sid = self.start(path)
        await self.send(sid, grpc_frame(message), end=True, **kw)
        reply = self.replies[sid]
        await self.pump(lambda: reply.ended or reply.reset is not None)
        return reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def server(limits: H2Limits = DEFAULT_LIMITS) -> AsyncIterator[tuple[int, Methods]]:
    methods = Methods()
    srv = await serve_grpc_h2(methods.table(), "127.0.0.1", 0, limits=limits)
    try:
        yield srv.sockets[0].getsockname()[1], methods
    finally:
        await srv.shutdown(grace=STEP_TIMEOUT)  # also waits until every server-side socket is closed


@contextlib.asynccontextmanager
async def client(limits: H2Limits = DEFAULT_LIMITS, **kw: Any) -> AsyncIterator[tuple[H2Client, Methods]]:
    async with server(limits) as (port, methods):
        c = await H2Client.open(port, **kw)
        try:
            yield c, methods
        finally:
            await c.close()


# -- success path ------------------------------------------------------------------------------------------
async def test_unary_call_echoes_the_message_with_grpc_headers_and_trailers() -> None:
    async with client() as (c, methods):
        reply = await c.call(ECHO, b"hello")
    assert reply.headers[b":status"] == b"200"
    assert reply.headers[b"content-type"] == b"application/grpc"
    assert reply.message == b"hello"
    assert reply.trailers == {b"grpc-status": b"0"}
    assert methods.calls == [ECHO]


async def test_empty_message_is_a_valid_request() -> None:
    async with client() as (c, _):
        reply = await c.call(ECHO, b"")
    assert reply.status == 0
    assert reply.message == b""


async def test_many_sequential_calls_cross_both_windows_in_both_directions() -> None:
    """250 calls x 40 KB = 10 MB through a 160 KiB connection window and 64 KiB stream windows: only
    our WINDOW_UPDATEs let the client go on; replies larger than a frame cross the client's windows."""
    payload = bytes(range(256)) * 160  # 40 KiB
    async with client(SMALL) as (c, methods):
        for i in range(250):
            reply = await c.call(ECHO if i % 2 else SLOW, payload + i.to_bytes(2, "big"))
            expected = payload + i.to_bytes(2, "big")
            assert reply.message == (expected if i % 2 else expected[::-1])
            assert reply.status == 0
    assert len(methods.calls) == 250
    assert c.window_updates["connection"] > 10
    assert c.window_updates["stream"] > 10


async def test_concurrent_streams_interleaved() -> None:
    async with client() as (c, methods):
        sids = [c.start(SLOW if i % 2 else ECHO) for i in range(20)]
        frames = {sid: grpc_frame(b"m%d-" % sid * 50) for sid in sids}
        for offset in range(0, 400, 100):  # interleave the pieces of every stream
            for sid in sids:
                if offset >= len(frames[sid]):
                    continue
                piece = frames[sid][offset : offset + 100]
                await c.send(sid, piece, end=offset + 100 >= len(frames[sid]))
        await c.pump(lambda: all(c.replies[s].ended for s in sids))
    for i, sid in enumerate(sids):
        msg = b"m%d-" % sid * 50
        assert c.replies[sid].message == (msg[::-1] if i % 2 else msg)
        assert c.replies[sid].status == 0
    assert len(methods.calls) == 20


async def test_message_split_over_many_padded_data_frames() -> None:
    message = b"abcdefghij" * 500
    async with client() as (c, _):
        plain = await c.call(ECHO, message, chunk=7)
        padded = await c.call(ECHO, message, chunk=33, pad=200)
    assert plain.message == message
    assert padded.message == message


async def test_large_header_block_arrives_in_continuation_frames() -> None:
    async with client() as (c, _):
        sid = c.start(ECHO, extra=[(b"x-big", b"v" * 40_000)])  # > 16384: HEADERS + CONTINUATION
        await c.send(sid, grpc_frame(b"cont"), end=True)
        await c.pump(lambda: c.replies[sid].ended)
    assert c.replies[sid].message == b"cont"


async def test_small_client_window_queues_the_reply_until_window_updates() -> None:
    """The client grants 100 bytes per stream: the 5 KB reply goes out as the client acknowledges."""
    async with client(settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100}) as (c, _):
        reply = await c.call(ECHO, b"z" * 5000)
    assert reply.message == b"z" * 5000


async def test_rst_stream_mid_request_drops_the_stream_and_the_connection_goes_on() -> None:
    async with client() as (c, methods):
        sid = c.start(ECHO)
        await c.send(sid, grpc_frame(b"partial")[:6], end=False)
        c.conn.reset_stream(sid)
        c.flush()
        reply = await c.call(ECHO, b"after")
    assert reply.message == b"after"
    assert methods.calls == [ECHO]  # the reset request never reached a method
    assert c.replies[sid].data == b""
    assert not c.replies[sid].ended


async def test_rst_stream_while_the_method_waits_is_never_answered() -> None:
    async with client() as (c, methods):
        sid = c.start(GATED)
        await c.send(sid, grpc_frame(b"g"), end=True)
        await c.pump(lambda: GATED in methods.calls)
        c.conn.reset_stream(sid)
        c.flush()
        await asyncio.sleep(0.01)
        methods.gate.set()
        reply = await c.call(ECHO, b"next")
    assert reply.message == b"next"
    assert c.replies[sid].headers == {}  # nothing was ever sent on the reset stream


async def test_ping_is_acked_with_the_same_payload() -> None:
    async with client() as (c, _):
        c.conn.ping(b"8 bytes!")
        c.flush()
        await c.pump(lambda: bool(c.pings))
    assert c.pings == [b"8 bytes!"]


async def test_goaway_from_the_client_finishes_open_streams_then_closes() -> None:
    async with client() as (c, methods):
        sid = c.start(GATED)
        await c.send(sid, grpc_frame(b"last"), end=True)
        await c.pump(lambda: GATED in methods.calls)
        # Raw GOAWAY(last_stream_id=0, NO_ERROR): h2 itself refuses to read anything once it sent one.
        c.writer.write(b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + bytes(8))
        await asyncio.sleep(0.01)
        assert not c.eof
        methods.gate.set()
        await c.pump(lambda: c.eof)
    assert c.replies[sid].message == b"last"
    assert c.eof


# -- gRPC statuses ---------------------------------------------------------------------------------------
async def test_unknown_path_is_unimplemented() -> None:
    async with client() as (c, methods):
        reply = await c.call("/no.Such/Method", b"x")
    assert reply.status == 12
    assert "/no.Such/Method" in reply.grpc_message
    assert methods.calls == []


async def test_compressed_flag_is_unimplemented() -> None:
    async with client() as (c, methods):
        sid = c.start(ECHO)
        await c.send(sid, grpc_frame(b"zz", flag=1), end=True)
        await c.pump(lambda: c.replies[sid].ended)
    assert c.replies[sid].status == 12
    assert methods.calls == []


async def test_grpc_encoding_other_than_identity_is_unimplemented() -> None:
    async with client() as (c, methods):
        sid = c.start(ECHO, extra=[(b"grpc-encoding", b"gzip")])
        await c.send(sid, grpc_frame(b"zz"), end=True)
        await c.pump(lambda: c.replies[sid].ended)
    assert c.replies[sid].status == 12
    assert "gzip" in c.replies[sid].grpc_message
    assert methods.calls == []


async def test_wrong_content_type_is_refused() -> None:
    async with client() as (c, methods):
        sid = c.start(ECHO, extra=[(b"content-type", b"text/plain")])
        await c.send(sid, grpc_frame(b"zz"), end=True)
        await c.pump(lambda: c.replies[sid].ended)
    assert c.replies[sid].headers[b":status"] == b"415"
    assert c.replies[sid].status == 12
    assert methods.calls == []


async def test_oversized_message_is_resource_exhausted_without_buffering_it() -> None:
    async with client(SMALL) as (c, methods):
        reply = await c.call(ECHO, b"o" * (SMALL.max_message_bytes + 1))
        after = await c.call(ECHO, b"fine")
    assert reply.status == 8
    assert after.message == b"fine"
    assert methods.calls == [ECHO]


async def test_missing_or_truncated_message_is_internal() -> None:
    async with client() as (c, methods):
        none = c.start(ECHO, end=True)
        short = c.start(ECHO)
        await c.send(short, grpc_frame(b"abc")[:-1], end=True)
        await c.pump(lambda: c.replies[none].ended and c.replies[short].ended)
    assert c.replies[none].status == 13
    assert c.replies[short].status == 13
    assert methods.calls == []


async def test_grpc_status_error_and_plain_exception(caplog: pytest.LogCaptureFixture) -> None:
    async with client() as (c, methods):
        denied = await c.call(FAIL, b"why")
        crashed = await c.call(CRASH, b"x")
        after = await c.call(ECHO, b"still here")
    assert methods.calls == [FAIL, CRASH, ECHO]
    assert denied.status == 7
    assert denied.grpc_message == "denied: 100% é\nwhy"
    assert crashed.status == 13
    assert after.message == b"still here"
    assert any("internal error" in r.getMessage() for r in caplog.records)


# -- a real grpc client ------------------------------------------------------------------------------------
def _grpc_calls(port: int) -> list[Any]:
    out: list[Any] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for path, message in ((ECHO, b"hi"), (SLOW, b"abc"), (ECHO, b"q" * 200_000), (FAIL, b"f")):
            try:
                out.append(channel.unary_unary(path)(message, timeout=STEP_TIMEOUT))
            except grpc.RpcError as exc:
                out.append((exc.code(), exc.details()))
        for path in ("/nope.S/M", CRASH):
            try:
                channel.unary_unary(path)(b"x", timeout=STEP_TIMEOUT)
            except grpc.RpcError as exc:
                out.append(exc.code())
    return out


async def test_real_grpc_client_sees_results_and_statuses() -> None:
    async with server() as (port, _):
        got = await asyncio.to_thread(_grpc_calls, port)
    assert got[0] == b"hi"
    assert got[1] == b"cba"
    assert got[2] == b"q" * 200_000
    assert got[3] == (grpc.StatusCode.PERMISSION_DENIED, "denied: 100% é\nf")
    assert got[4] == grpc.StatusCode.UNIMPLEMENTED
    assert got[5] == grpc.StatusCode.INTERNAL


async def test_real_grpc_client_concurrent_calls() -> None:
    async with server() as (port, _):

        def many() -> list[bytes]:
            results: list[bytes] = []
            lock = threading.Lock()
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = channel.unary_unary(SLOW)
                futures = [stub.future(b"%d" % i, timeout=STEP_TIMEOUT) for i in range(50)]
                for f in futures:
                    with lock:
                        results.append(f.result())
            return results

        got = await asyncio.to_thread(many)
    assert got == [(b"%d" % i)[::-1] for i in range(50)]


# -- graceful shutdown -------------------------------------------------------------------------------------
async def test_shutdown_sends_goaway_and_holds_for_the_call_in_flight() -> None:
    """GOAWAY(NO_ERROR) naming the last accepted stream reaches the client at once; shutdown waits for the
    call in flight (the h2 package's client state machine stops at GOAWAY, so the answer itself is
    checked with grpc's client below)."""
    methods = Methods()
    srv = await serve_grpc_h2(methods.table(), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    c = await H2Client.open(port)
    try:
        sid = c.start(GATED)
        await c.send(sid, grpc_frame(b"late"), end=True)
        await c.pump(lambda: GATED in methods.calls)
        stopping = asyncio.ensure_future(srv.shutdown(grace=STEP_TIMEOUT))
        await c.pump(lambda: c.terminated is not None)
        assert c.terminated is not None and c.terminated.error_code == 0
        assert c.terminated.last_stream_id == sid
        await asyncio.sleep(0.05)
        assert not stopping.done()  # the call in flight holds the shutdown
        methods.gate.set()
        await asyncio.wait_for(stopping, STEP_TIMEOUT)
        assert srv.sockets == ()  # no longer listening
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await c.close()


def test_a_grpc_client_gets_its_answer_across_a_graceful_shutdown() -> None:
    """grpc's own client: the call in flight when the server starts shutting down completes with OK."""
    import concurrent.futures

    from tests.integration.loop_thread import loop_thread

    methods = Methods()
    with loop_thread() as lt:
        srv = lt.run(serve_grpc_h2(methods.table(), "127.0.0.1", 0))
        port = srv.sockets[0].getsockname()[1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            future = channel.unary_unary(GATED).future(b"across", timeout=STEP_TIMEOUT)
            deadline = time.monotonic() + STEP_TIMEOUT
            while GATED not in methods.calls and time.monotonic() < deadline:
                time.sleep(0.01)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                stopping = pool.submit(lt.run, srv.shutdown(grace=STEP_TIMEOUT))
                time.sleep(0.1)  # the GOAWAY is out; the call is still held, and so is the shutdown
                assert not future.done() and not stopping.done()
                lt.call(methods.gate.set)
                assert future.result(timeout=STEP_TIMEOUT) == b"across"
                stopping.result(timeout=STEP_TIMEOUT)


async def test_shutdown_gives_up_on_a_call_that_outlives_the_grace_period() -> None:
    methods = Methods()
    srv = await serve_grpc_h2(methods.table(), "127.0.0.1", 0)
    c = await H2Client.open(srv.sockets[0].getsockname()[1])
    try:
        sid = c.start(GATED)
        await c.send(sid, grpc_frame(b"never"), end=True)
        await c.pump(lambda: GATED in methods.calls)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(srv.shutdown(grace=0.2), STEP_TIMEOUT)
        assert 0.2 <= loop.time() - started < STEP_TIMEOUT
        await c.pump(lambda: False)
        assert c.eof and not c.replies[sid].ended  # aborted, never answered
    finally:
        methods.gate.set()
        await c.close()

"""The h2c gRPC protocol fed frames directly (no socket): RFC 9113 errors, HPACK block cache, fuzzing."""

from __future__ import annotations

import struct
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.errors import ConfigError
from authz.server import grpc_h2
from authz.server.grpc_h2 import DEFAULT_LIMITS, GrpcH2Protocol, GrpcStatusError, H2Limits

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20
PATH = "/t.S/Echo"


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, sid) + payload


def parse(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(raw):
        assert len(raw) - pos >= 9, "a partial frame was written"
        word, flags, sid = struct.unpack_from(">IBI", raw, pos)
        end = pos + 9 + (word >> 8)
        assert end <= len(raw), "a partial frame was written"
        out.append((word & 0xFF, flags, sid, raw[pos + 9 : end]))
        pos = end
    return out


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.writes = 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data
        self.writes += 1

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def echo(message: bytes) -> bytes:
    return message


async def deny(message: bytes) -> bytes:
    raise GrpcStatusError(7, "no")


class Wire:
    def __init__(self, limits: H2Limits = DEFAULT_LIMITS) -> None:
        self.proto = GrpcH2Protocol({PATH: echo, "/t.S/Deny": deny}, limits)
        self.transport = FakeTransport()
        self.proto.connection_made(self.transport)  # type: ignore[arg-type]
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.seen = 0

    def feed(self, raw: bytes) -> None:
        self.proto.data_received(raw)

    def start(self) -> None:
        self.feed(PREFACE + frame(SETTINGS, 0, 0))

    def block(self, path: str = PATH, **extra: str) -> bytes:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            *extra.items(),
        ]
        return bytes(self.encoder.encode(headers))

    def call(self, sid: int, message: bytes, path: str = PATH) -> bytes:
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        return frame(HEADERS, END_HEADERS, sid, self.block(path)) + frame(DATA, END_STREAM, sid, body)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """Frames written since the last look."""
        new = parse(bytes(self.transport.written))[self.seen :]
        self.seen += len(new)
        return new

    def goaway_code(self) -> int | None:
        last = parse(bytes(self.transport.written))[-1]
        if last[0] != GOAWAY:
            return None
        assert self.transport.closed
        return int.from_bytes(last[3][4:8], "big")

    def replies(self) -> dict[int, tuple[int, bytes]]:
        """stream -> (grpc-status, message) for every complete response written so far."""
        out: dict[int, tuple[int, bytes]] = {}
        data: dict[int, bytes] = {}
        for ftype, flags, sid, payload in parse(bytes(self.transport.written)):
            if ftype == DATA:
                data[sid] = data.get(sid, b"") + payload
            elif ftype == HEADERS:
                headers: dict[Any, Any] = dict(self.decoder.decode(payload))
                if flags & END_STREAM:
                    out[sid] = (int(headers["grpc-status"]), data.get(sid, b"")[5:])
        return out


def test_server_preface_is_settings_then_a_connection_window_update() -> None:
    w = Wire()
    (s_type, s_flags, s_sid, s_payload), (u_type, _, u_sid, u_payload) = w.frames()
    assert (s_type, s_flags, s_sid) == (SETTINGS, 0, 0)
    settings_ = dict(struct.iter_unpack(">HI", s_payload))
    assert settings_[0x3] == 1000 and settings_[0x4] == 4 * 1024 * 1024 and 0x6 in settings_
    assert (u_type, u_sid) == (WINDOW, 0)
    assert int.from_bytes(u_payload, "big") == 4 * 1024 * 1024 - 65535


def test_preface_split_byte_by_byte_then_a_call_is_answered_in_one_write() -> None:
    w = Wire()
    w.frames()
    for i in range(len(PREFACE)):
        w.feed(PREFACE[i : i + 1])
    w.feed(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1 << 20)))
    assert [f[:2] for f in w.frames()] == [(SETTINGS, ACK)]
    writes = w.transport.writes
    w.feed(w.call(1, b"ping"))
    assert w.transport.writes == writes + 1
    assert [f[0] for f in w.frames()] == [HEADERS, DATA, HEADERS]
    assert w.replies() == {1: (0, b"ping")}


def test_bad_preface_closes_without_goaway() -> None:
    w = Wire()
    w.frames()
    w.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert w.transport.closed
    assert w.frames() == []


def test_ping_ack_and_unknown_and_priority_frames_are_ignored() -> None:
    w = Wire()
    w.start()
    w.frames()
    w.feed(
        frame(0xEE, 0xFF, 3, b"whatever") + frame(PRIORITY, 0, 9, bytes(5)) + frame(PING, 0, 0, b"abcdefgh")
    )
    assert w.frames() == [(PING, ACK, 0, b"abcdefgh")]
    w.feed(w.call(1, b"x"))
    assert w.replies() == {1: (0, b"x")}


def test_padded_headers_with_priority_and_padded_data() -> None:
    w = Wire()
    w.start()
    block = w.block()
    headers = bytes((10,)) + bytes(5) + block + bytes(10)
    body = b"\x00\x00\x00\x00\x03abc"
    w.feed(frame(HEADERS, END_HEADERS | PADDED | PRIO, 1, headers))
    w.feed(frame(DATA, END_STREAM | PADDED, 1, bytes((3,)) + body + b"pad"))
    assert w.replies() == {1: (0, b"abc")}


def test_continuation_frames_carry_one_header_block() -> None:
    w = Wire()
    w.start()
    block = w.block(**{"x-a": "1" * 50})
    parts = [block[i : i + 10] for i in range(0, len(block), 10)]
    raw = frame(HEADERS, 0, 1, parts[0])
    raw += b"".join(frame(CONT, 0, 1, p) for p in parts[1:-1]) + frame(CONT, END_HEADERS, 1, parts[-1])
    w.feed(raw + frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x01z"))
    assert w.replies() == {1: (0, b"z")}


def test_trailers_only_status_and_percent_encoded_message() -> None:
    w = Wire()
    w.start()
    w.frames()
    w.feed(w.call(1, b"", path="/t.S/Deny"))
    ((ftype, flags, _, payload),) = w.frames()
    assert (ftype, flags) == (HEADERS, END_STREAM | END_HEADERS)
    headers: dict[Any, Any] = dict(w.decoder.decode(payload))
    assert headers["grpc-status"] == "7" and headers["grpc-message"] == "no"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (frame(DATA, 0, 1, b"x"), 0x1),  # the first frame after the preface must be SETTINGS
        (frame(SETTINGS, 0, 0) + frame(PING, 0, 0, b"short"), 0x6),
        (frame(SETTINGS, 0, 0, b"12345"), 0x6),
        (frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0, b"xxxxxx"), 0x6),
        (frame(SETTINGS, 0, 1), 0x1),
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 0x2, 2)), 0x1),
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2**31)), 0x3),
        (frame(SETTINGS, 0, 0, struct.pack(">HI", 0x5, 100)), 0x1),
        (frame(SETTINGS, 0, 0) + struct.pack(">IBI", 16385 << 8 | DATA, 0, 1), 0x6),
        (frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 2, b"\x82"), 0x1),
        (frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 0, b"\x82"), 0x1),
        (frame(SETTINGS, 0, 0) + frame(DATA, 0, 5, b"x"), 0x1),
        (frame(SETTINGS, 0, 0) + frame(DATA, 0, 0, b"x"), 0x1),
        (frame(SETTINGS, 0, 0) + frame(HEADERS, 0, 1, b"\x83") + frame(PING, 0, 0, bytes(8)), 0x1),
        (frame(SETTINGS, 0, 0) + frame(CONT, END_HEADERS, 1, b"\x83"), 0x1),
        (frame(SETTINGS, 0, 0) + frame(HEADERS, 0, 1, b"\x83") + frame(CONT, END_HEADERS, 3, b"\x83"), 0x1),
        (frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), 0x9),
        (frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS | PADDED, 1, b"\x05ab"), 0x1),
        (frame(SETTINGS, 0, 0) + frame(WINDOW, 0, 0, bytes(4)), 0x1),
        (frame(SETTINGS, 0, 0) + frame(WINDOW, 0, 0, b"\x7f\xff\xff\xff"), 0x3),
        (frame(SETTINGS, 0, 0) + frame(WINDOW, 0, 0, b"\x00"), 0x6),
        (frame(SETTINGS, 0, 0) + frame(WINDOW, 0, 7, b"\x00\x00\x00\x01"), 0x1),
        (frame(SETTINGS, 0, 0) + frame(RST, 0, 7, bytes(4)), 0x1),
        (frame(SETTINGS, 0, 0) + frame(RST, 0, 0, bytes(4)), 0x1),
        (frame(SETTINGS, 0, 0) + frame(PUSH, END_HEADERS, 1, bytes(4)), 0x1),
        (frame(SETTINGS, 0, 0) + frame(PRIORITY, 0, 1, bytes(4)), 0x6),
        (frame(SETTINGS, 0, 0) + frame(GOAWAY, 0, 0, bytes(4)), 0x6),
    ],
)
def test_connection_errors_answer_goaway_with_the_rfc_code_and_close(raw: bytes, code: int) -> None:
    w = Wire()
    w.feed(PREFACE + raw)
    assert w.goaway_code() == code
    written = len(w.transport.written)
    w.feed(frame(PING, 0, 0, bytes(8)))  # nothing more is read or written
    assert len(w.transport.written) == written


def test_header_block_larger_than_the_limit_is_enhance_your_calm() -> None:
    w = Wire(H2Limits(max_header_list_bytes=2048))
    w.start()
    block = w.block(**{"x-big": "v" * 1500})
    w.feed(frame(HEADERS, 0, 1, block) + frame(CONT, 0, 1, block))
    assert w.goaway_code() == 0xB


def test_data_beyond_the_connection_window_is_a_flow_control_error() -> None:
    """Request bytes held for an incomplete message are not given back: the peer must stay inside."""
    limits = H2Limits(max_message_bytes=69_000, connection_window_size=70_000, initial_window_size=65535)
    w = Wire(limits)
    w.start()
    w.feed(
        frame(HEADERS, END_HEADERS, 1, w.block()) + frame(DATA, 0, 1, b"\x00" + (69_000).to_bytes(4, "big"))
    )
    for _ in range(4):
        w.feed(frame(DATA, 0, 1, bytes(16000)))
    assert w.goaway_code() is None
    w.feed(frame(DATA, 0, 1, bytes(16000)))
    assert w.goaway_code() == 0x3


def test_streams_beyond_max_concurrent_are_refused_but_their_headers_decoded() -> None:
    w = Wire(H2Limits(max_concurrent_streams=2))
    w.start()
    for sid in (1, 3, 5):
        w.feed(frame(HEADERS, END_HEADERS, sid, w.block()))
    assert [(f[0], f[2], f[3]) for f in w.frames()[-1:]] == [(RST, 5, b"\x00\x00\x00\x07")]
    # Streams 1 and 3 still complete; HPACK state survived the refused block.
    w.feed(frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x01a") + w.call(7, b"b"))
    w.feed(frame(DATA, END_STREAM, 3, b"\x00\x00\x00\x00\x01c"))
    assert w.replies() == {1: (0, b"a"), 7: (0, b"b"), 3: (0, b"c")}


def test_data_on_a_stream_already_answered_is_ignored() -> None:
    w = Wire()
    w.start()
    w.feed(frame(HEADERS, END_HEADERS | END_STREAM, 1, w.block("/none")))  # answered at once: 12
    w.feed(frame(DATA, 0, 1, b"late"))  # a closed stream: ignored
    assert w.replies()[1][0] == 12
    assert w.goaway_code() is None


def test_peer_header_table_size_change_signals_a_size_update_in_our_next_block() -> None:
    w = Wire()
    w.start()
    w.feed(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x1, 0)))
    w.frames()
    w.feed(w.call(1, b"t"))
    first, *_ = w.frames()
    assert first[0] == HEADERS and first[3][:1] == b"\x20"
    w.feed(w.call(3, b"u"))
    assert w.frames()[0][3][:1] != b"\x20"
    assert w.replies() == {1: (0, b"t"), 3: (0, b"u")}


def test_steady_state_header_block_is_decoded_once() -> None:
    w = Wire()
    w.start()
    decoded: list[bytes] = []
    real = w.proto._decoder.decode

    def counting(data: bytes, raw: bool = False) -> Any:
        decoded.append(data)
        return real(data, raw=raw)

    w.proto._decoder.decode = counting  # type: ignore[method-assign]
    for sid in range(1, 21, 2):
        w.feed(w.call(sid, b"m"))
    assert len(w.replies()) == 10
    # The first block inserts into the dynamic table (not cacheable), the second is all indexed (cached),
    # every later one is the same bytes: a dict hit.
    assert len(decoded) == 2
    assert decoded[0] != decoded[1]


def test_a_table_changing_block_clears_the_cache() -> None:
    w = Wire()
    w.start()
    w.feed(w.call(1, b"a") + w.call(3, b"b"))
    assert len(w.proto._blocks) == 1
    w.feed(w.call(5, b"c", path="/t.S/Other"))  # a new :path literal is indexed: the table changes
    assert len(w.proto._blocks) == 0
    assert w.replies()[5][0] == 12


# The block cache: with or without it, every block gets the same answer (hpack Encoder as the peer,
# random header lists with repeats, table size updates from random HEADER_TABLE_SIZE settings).
_header = st.tuples(
    st.sampled_from(["x-a", "x-b", "authorization", "grpc-encoding", "content-type", ":path", "x-long"]),
    st.sampled_from(["1", "2", "identity", "gzip", "application/grpc", "text/plain", "/t.S/Echo", "v" * 300]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.lists(_header, max_size=6), st.sampled_from([None, 0, 256, 4096])),
        min_size=1,
        max_size=12,
    )
)
def test_block_cache_never_changes_an_answer(calls: list[tuple[list[tuple[str, str]], int | None]]) -> None:
    cached, uncached = Wire(), Wire(H2Limits(max_cached_blocks=0))
    for w in (cached, uncached):
        w.start()
    encoder = hpack.Encoder()
    for i, (extra, table_size) in enumerate(calls):
        if table_size is not None:
            encoder.header_table_size = table_size
        headers = [(":method", "POST"), (":path", PATH), ("content-type", "application/grpc"), *extra]
        raw = frame(HEADERS, END_HEADERS, 2 * i + 1, bytes(encoder.encode(headers)))
        raw += frame(DATA, END_STREAM, 2 * i + 1, b"\x00\x00\x00\x00\x01q")
        cached.feed(raw)
        uncached.feed(raw)
    assert cached.transport.written == uncached.transport.written


# -- fuzzing: never raise, never hang, end in answers or GOAWAY/close ---------------------------------
def _assert_sane(w: Wire) -> None:
    frames = parse(bytes(w.transport.written))
    assert {f[0] for f in frames} <= {SETTINGS, WINDOW, HEADERS, DATA, RST, PING, GOAWAY}
    if any(f[0] == GOAWAY for f in frames):
        assert frames[-1][0] == GOAWAY
        assert w.transport.closed


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_bytes_after_the_preface(chunks: list[bytes]) -> None:
    w = Wire()
    w.feed(PREFACE)
    for chunk in chunks:
        w.feed(chunk)
    _assert_sane(w)


_VALID_BLOCK = bytes(
    hpack.Encoder().encode([(":method", "POST"), (":path", PATH), ("content-type", "application/grpc")])
)
_frames = st.tuples(
    st.integers(0, 11),
    st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25, 0xFF]),
    st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]),
    st.one_of(
        st.binary(max_size=40),
        st.just(_VALID_BLOCK),
        st.just(b"\x00\x00\x00\x00\x02hi"),
        st.just(struct.pack(">HI", 0x4, 10)),
        st.just(b"\x00\x00\x00\x01"),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_frames, max_size=12), st.booleans())
def test_arbitrary_frame_sequences(frames: list[tuple[int, int, int, bytes]], settings_first: bool) -> None:
    w = Wire(H2Limits(max_concurrent_streams=2))
    w.feed(PREFACE + (frame(SETTINGS, 0, 0) if settings_first else b""))
    for ftype, flags, sid, payload in frames:
        w.feed(frame(ftype, flags, sid, payload))
    _assert_sane(w)
    if not w.transport.closed:  # still open: every answered stream got a well-formed response
        for status, _ in w.replies().values():
            assert 0 <= status < 256


# -- the public surface ----------------------------------------------------------------------------------
def test_exported_names() -> None:
    assert set(grpc_h2.__all__) == {
        "DEFAULT_CONNECTION_WINDOW",
        "DEFAULT_INITIAL_WINDOW",
        "DEFAULT_LIMITS",
        "DEFAULT_MAX_CONCURRENT_STREAMS",
        "DEFAULT_MAX_MESSAGE_BYTES",
        "GRPC_INTERNAL",
        "GRPC_INVALID_ARGUMENT",
        "GRPC_NOT_FOUND",
        "GRPC_OK",
        "GRPC_RESOURCE_EXHAUSTED",
        "GRPC_UNIMPLEMENTED",
        "GrpcH2Protocol",
        "GrpcH2Server",
        "GrpcStatusError",
        "H2Limits",
        "UnaryMethod",
        "serve_grpc_h2",
    }


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        H2Limits(connection_window_size=1000)
    with pytest.raises(ConfigError):
        H2Limits(initial_window_size=100)
    with pytest.raises(ValueError):
        GrpcStatusError(0, "ok is not an error")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_grpc_message_percent_encoding_round_trips(text: str) -> None:
    from urllib.parse import unquote_to_bytes

    encoded = grpc_h2._percent_encode(text)
    assert all(0x20 <= c <= 0x7E for c in encoded)
    assert unquote_to_bytes(encoded.decode("ascii")) == text.encode("utf-8", "replace")


def test_go_away_answers_open_streams_refuses_new_ones_then_closes() -> None:
    """RFC 9113 §6.8 graceful shutdown: GOAWAY(NO_ERROR, last accepted stream); stream 1 (headers seen,
    body not yet) is still answered; stream 3 opened after the GOAWAY is refused; then the close."""
    w = Wire()
    w.start()
    w.feed(frame(HEADERS, END_HEADERS, 1, w.block()))
    w.frames()
    w.proto.stop_gracefully()
    goaway = w.frames()[-1]
    assert goaway[0] == GOAWAY and goaway[3] == (1).to_bytes(4, "big") + (0).to_bytes(4, "big")
    assert not w.transport.closed and not w.proto.finished
    w.feed(frame(HEADERS, END_HEADERS | END_STREAM, 3, w.block()))
    assert [(f[0], f[2], f[3]) for f in w.frames()] == [(RST, 3, b"\x00\x00\x00\x07")]
    w.feed(frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x02ok"))
    assert w.replies() == {1: (0, b"ok")}
    assert w.transport.closed and w.proto.finished


def test_go_away_on_an_idle_connection_closes_it_at_once() -> None:
    w = Wire()
    w.start()
    w.feed(w.call(1, b"a"))
    w.proto.stop_gracefully()
    w.proto.stop_gracefully()  # idempotent
    assert [f[0] for f in w.frames()].count(GOAWAY) == 1
    assert w.transport.closed

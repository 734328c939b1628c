"""A lean unary gRPC server over cleartext HTTP/2 (h2c) for Envoy's ext_authz ``grpc_service`` calls.

``grpc.aio`` costs ~120 us of CPU per call behind Envoy even for an allow-all handler (its C core, a poller
thread handing events to asyncio, ~30 syscalls per call). This front speaks just enough HTTP/2 (RFC 9113)
for unary gRPC (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md) as one asyncio
Protocol, in the style of :mod:`authz.server.http_ext_authz`: bytes in, frames parsed in place, the
handler started with :func:`~authz.server.http_ext_authz.run_eagerly` so a handler that never waits is
answered from ``data_received`` with one ``transport.write`` and no Task.

HPACK (RFC 7541) is decoded with the ``hpack`` package, behind a cache of whole header blocks: a block
whose decoding leaves the decoder's dynamic table as it was is a pure function of its bytes and of that
table, so ``block bytes -> verdict`` holds until the table changes (the cache is cleared then). Envoy
sends the same block on every call once its headers sit in the dynamic table, so the steady state is one
dict lookup. We encode our own blocks as literals without indexing (RFC 7541 §6.2.2): our encoder keeps
no state and the blocks are byte constants.

Flow control (RFC 9113 §5.2, §6.9): we never send DATA beyond the peer's connection and stream windows
(queued and flushed on WINDOW_UPDATE or a SETTINGS change); our receive windows are replenished as
request bytes are consumed, so a long-lived connection never stalls, and held request bytes stay bounded
by the connection window.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

import hpack

from authz.errors import AuthzError, ConfigError
from authz.server.graceful import GracefulServer
from authz.server.http_ext_authz import run_eagerly
from authz.server.limits import MAX_HEADERS_BYTES

__all__ = [
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
]

log = logging.getLogger("authz.server.grpc_h2")

UnaryMethod = Callable[[bytes], Awaitable[bytes]]
"""A unary gRPC method: the request message bytes in, the response message bytes out. May raise
:class:`GrpcStatusError` to answer a non-OK status; any other exception answers 13 INTERNAL."""

# gRPC status codes (https://github.com/grpc/grpc/blob/master/doc/statuscodes.md).
GRPC_OK = 0
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13


class GrpcStatusError(AuthzError):
    """Raised by a :data:`UnaryMethod` to answer ``grpc-status: code`` with ``grpc-message: message``."""

    reason = "grpc_status"

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        if not 0 < code < 256:
            raise ValueError(f"grpc status code must be in 1..255, got {code}")
        self.code = code


class _ConnectionError(AuthzError):
    """An HTTP/2 connection error (RFC 9113 §5.4.1): answered with GOAWAY(code) and a close."""

    reason = "h2_connection_error"

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- Defaults ------------------------------------------------------------------------------------------
# As grpc-core's default MAX_CONCURRENT_STREAMS bound (it advertises none, clients cap near 100-1000);
# Envoy's generated bootstrap opens one stream per connection anyway.
DEFAULT_MAX_CONCURRENT_STREAMS = 1000
# A CheckRequest is a few KiB; with Envoy's with_request_body it carries up to the body the HTTP front also
# accepts (1 MiB, authz.server.http_ext_authz.MAX_BODY_BYTES). grpc's default (4 MiB) is more than a check
# needs, and every byte allowed here is memory a connection may make us hold.
DEFAULT_MAX_MESSAGE_BYTES = 2 * 1024 * 1024
# Stream receive window: large enough that a request never waits on a stream WINDOW_UPDATE.
DEFAULT_INITIAL_WINDOW = 4 * 1024 * 1024
# Connection receive window: must exceed one whole maximal message (plus framing) so that any single
# request can complete; it also bounds the request bytes held across all incomplete streams.
DEFAULT_CONNECTION_WINDOW = 4 * 1024 * 1024
# Bound on the block -> verdict cache (Envoy sends a handful of distinct blocks).
DEFAULT_MAX_CACHED_BLOCKS = 256


@dataclass(frozen=True, slots=True)
class H2Limits:
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """A request message larger than this is answered 8 RESOURCE_EXHAUSTED (and not buffered)."""
    max_header_list_bytes: int = MAX_HEADERS_BYTES
    """SETTINGS_MAX_HEADER_LIST_SIZE, the decoded bound, and the bound on one compressed block."""
    initial_window_size: int = DEFAULT_INITIAL_WINDOW
    connection_window_size: int = DEFAULT_CONNECTION_WINDOW
    max_cached_blocks: int = DEFAULT_MAX_CACHED_BLOCKS

    def __post_init__(self) -> None:
        if not 0 < self.max_concurrent_streams < 2**31:
            raise ConfigError("must be in 1..2**31-1", field="max_concurrent_streams")
        # Below 65535 a peer that has not yet seen our SETTINGS may legitimately overrun it (RFC 9113
        # §6.9.2), so we do not offer smaller stream windows.
        if not 65535 <= self.initial_window_size < 2**31:
            raise ConfigError("must be in 65535..2**31-1", field="initial_window_size")
        if not self.max_message_bytes + 5 < self.connection_window_size < 2**31:
            raise ConfigError(
                "must exceed max_message_bytes + 5 and stay below 2**31", field="connection_window_size"
            )
        if self.max_message_bytes < 0 or self.max_header_list_bytes < 1024 or self.max_cached_blocks < 0:
            raise ConfigError("max_message_bytes, max_header_list_bytes or max_cached_blocks out of range")


DEFAULT_LIMITS = H2Limits()


# -- HTTP/2 constants (RFC 9113 §6, §7, §11) ----------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
DEFAULT_WINDOW = 65535  # RFC 9113 §6.5.2 / §6.9.2
MAX_WINDOW = 2**31 - 1
OUR_MAX_FRAME_SIZE = 16384  # we never advertise SETTINGS_MAX_FRAME_SIZE: the RFC 9113 §4.2 default holds
MAX_GRPC_MESSAGE_TEXT = 1024  # grpc-message is truncated to this many characters: one frame, always

# Frame header (RFC 9113 §4.1): 24-bit length and 8-bit type as one big-endian word, flags, stream id.
_HEAD = struct.Struct(">IBI")
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | ftype, flags, stream_id) + payload


# -- HPACK encoding: literals without indexing (RFC 7541 §6.2.2), so the encoder has no state ----------
def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An integer with an N-bit prefix (RFC 7541 §5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:  # bounded: ceil(log128(value)) iterations
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """Literal Header Field without Indexing, New Name (RFC 7541 §6.2.2, first byte 0x00), no Huffman."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


_RESPONSE_HEADERS = _literal(b":status", b"200") + _literal(b"content-type", b"application/grpc")
_TRAILERS_OK = _literal(b"grpc-status", b"0")
# RFC 7541 §6.3: Dynamic Table Size Update to 0, sent once after the peer changes HEADER_TABLE_SIZE
# (§4.2: the encoder signals its choice at the start of the next block); we never use the table.
_TABLE_SIZE_ZERO = b"\x20"


# Each byte as grpc-message carries it: printable ASCII except "%" as is, everything else as %XX.
_PERCENT = [bytes((c,)) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in range(256)]


def _percent_encode(message: str) -> bytes:
    """grpc-message: UTF-8, then every byte outside printable ASCII (0x20-0x7E) and ``%`` itself as
    ``%XX`` (PROTOCOL-HTTP2.md, "Responses": Status-Message)."""
    return b"".join([_PERCENT[c] for c in message[:MAX_GRPC_MESSAGE_TEXT].encode("utf-8", "replace")])


def _status_block(code: int, message: str, http_status: bytes = b"200") -> bytes:
    """A Trailers-Only response (PROTOCOL-HTTP2.md): HTTP status, content-type, grpc-status, message."""
    block = (
        _literal(b":status", http_status)
        + _literal(b"content-type", b"application/grpc")
        + _literal(b"grpc-status", str(code).encode())
    )
    if message:
        block += _literal(b"grpc-message", _percent_encode(message))
    return block


# -- Request header blocks, validated once per distinct block -------------------------------------------
@dataclass(frozen=True, slots=True)
class _Verdict:
    """What a request header block decides: the method path, or a status to answer right away."""

    path: str
    error: tuple[int, str] | None = None
    http_status: bytes = b"200"


def _verdict(headers: list[tuple[bytes, bytes]]) -> _Verdict:
    """Check what PROTOCOL-HTTP2.md requires of a request (POST, application/grpc*, identity encoding);
    every other header is ignored."""
    method = path = content_type = b""
    encoding = b"identity"
    for name, value in headers:
        if name == b":path":
            path = value
        elif name == b":method":
            method = value
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-encoding":
            encoding = value
    text = path.decode("utf-8", "replace")
    if method != b"POST":
        return _Verdict(
            text, (GRPC_UNIMPLEMENTED, f"method {method.decode('latin-1')!r} is not POST"), b"405"
        )
    if not content_type.startswith(b"application/grpc"):
        return _Verdict(text, (GRPC_UNIMPLEMENTED, "content-type is not application/grpc"), b"415")
    if encoding != b"identity":
        return _Verdict(
            text, (GRPC_UNIMPLEMENTED, f"grpc-encoding {encoding.decode('latin-1')!r} is not supported")
        )
    return _Verdict(text)


class _Stream:
    """One client-initiated stream: its request so far, our receive window, its send state."""

    __slots__ = (
        "body",
        "ended",
        "error",
        "expected",
        "id",
        "out",
        "out_end",
        "out_pos",
        "recv_window",
        "send_window",
        "verdict",
    )

    def __init__(self, stream_id: int, verdict: _Verdict | None, recv_window: int, send_window: int) -> None:
        self.id = stream_id
        self.verdict = verdict
        self.error: tuple[int, str] | None = verdict.error if verdict is not None else None
        self.body = bytearray()
        self.expected = -1  # the message length once its 5-byte prefix has arrived
        self.ended = False  # the client's END_STREAM arrived: the request is complete
        self.recv_window = recv_window
        self.send_window = send_window
        self.out = b""  # response DATA not yet sent (flow control), from out_pos on
        self.out_pos = 0
        self.out_end = b""  # the trailers frame, sent after the DATA


class GrpcH2Protocol(asyncio.Protocol):
    """One h2c connection carrying unary gRPC calls (many concurrent streams, answered as they finish)."""

    __slots__ = (
        "_blocks",
        "_buffer",
        "_closed",
        "_cont_block",
        "_cont_end_stream",
        "_cont_stream",
        "_decoder",
        "_goaway_received",
        "_goaway_sent",
        "_last_stream_id",
        "_limits",
        "_methods",
        "_out",
        "_peer_initial_window",
        "_peer_max_frame",
        "_preface",
        "_preface_done",
        "_recv_released",
        "_recv_window",
        "_registry",
        "_send_window",
        "_settings_seen",
        "_streams",
        "_table_update",
        "_transport",
        "_writing",
    )

    def __init__(
        self,
        methods: Mapping[str, UnaryMethod],
        limits: H2Limits = DEFAULT_LIMITS,
        registry: set[GrpcH2Protocol] | None = None,
    ) -> None:
        self._methods = methods
        self._registry = registry  # the server's open connections (GrpcH2Server.shutdown), if any
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._preface = b""  # the part of the client preface seen so far, until complete
        self._preface_done = False
        self._settings_seen = False
        self._buffer = b""
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        self._decoder = hpack.Decoder(max_header_list_size=limits.max_header_list_bytes)
        self._blocks: dict[bytes, _Verdict] = {}
        self._cont_stream = 0  # the stream whose header block continues in CONTINUATION frames
        self._cont_block = b""
        self._cont_end_stream = False
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = OUR_MAX_FRAME_SIZE
        self._send_window = DEFAULT_WINDOW
        self._recv_window = limits.connection_window_size
        self._recv_released = 0
        self._table_update = b""
        self._goaway_received = False
        self._goaway_sent = False  # we are shutting down: no new streams, close once the open ones end
        self._out: list[bytes] = []
        self._writing = False  # inside data_received: output is collected and written once

    # -- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        if self._registry is not None:
            self._registry.add(self)
        limits = self._limits
        # RFC 9113 §3.4: the server preface is a SETTINGS frame, sent without waiting for the client's.
        settings = b"".join(
            _SETTING.pack(ident, value)
            for ident, value in (
                (SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
                (SETTINGS_INITIAL_WINDOW_SIZE, limits.initial_window_size),
                (SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_bytes),
            )
        )
        # RFC 9113 §6.9.2: the connection window is changed only by WINDOW_UPDATE, never by SETTINGS.
        raise_by = limits.connection_window_size - DEFAULT_WINDOW
        self._transport.write(
            _frame(SETTINGS, 0, 0, settings) + _frame(WINDOW_UPDATE, 0, 0, _U32.pack(raise_by))
        )

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._writing = True
        try:
            if not self._preface_done:
                rest = self._take_preface(data)
                if rest is None:
                    return
                data = rest
            if self._buffer:
                data = self._buffer + data
                self._buffer = b""
            self._receive(data)
        except _ConnectionError as exc:
            self._goaway(exc.code, exc.message)
        finally:
            self._writing = False
            self._write_collected()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; open streams have no one to answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport = None
        self._streams.clear()
        if self._registry is not None:
            self._registry.discard(self)

    # -- graceful shutdown ----------------------------------------------------------------------------
    def stop_gracefully(self) -> None:
        """RFC 9113 §6.8 graceful shutdown: GOAWAY(NO_ERROR) naming the last stream we accepted; the streams
        up to it are answered, later ones refused (the client retries them on a new connection); the
        connection closes once the last open stream is answered."""
        if self._closed or self._goaway_sent:
            return
        self._goaway_sent = True
        self._emit(_frame(GOAWAY, 0, 0, _U32.pack(self._last_stream_id) + _U32.pack(NO_ERROR)))
        self._maybe_finish()

    @property
    def finished(self) -> bool:
        """Closed, or nothing left to answer."""
        return self._closed or not self._streams

    def abort(self) -> None:
        """Close now, whatever is still open (the end of a shutdown's grace period)."""
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    # -- output -------------------------------------------------------------------------------------------
    def _emit(self, raw: bytes) -> None:
        """Send ``raw`` now, or, inside ``data_received``, with everything else it produces in one write."""
        if self._writing:
            self._out.append(raw)
        elif self._transport is not None and not self._closed:
            self._transport.write(raw)

    def _write_collected(self) -> None:
        transport = self._transport
        if transport is None:
            self._out.clear()
            return
        if self._out:
            out = self._out
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self._closed:
            transport.close()

    def _close(self) -> None:
        """Close once what was emitted has been written (at the end of ``data_received`` if inside it)."""
        self._closed = True
        if not self._writing and self._transport is not None:
            self._transport.close()

    def _goaway(self, code: int, message: str) -> None:
        """RFC 9113 §5.4.1: GOAWAY naming the last stream we processed and the error, then close."""
        if self._closed:
            return
        log.debug("h2 connection error %d: %s", code, message)
        debug = message.encode("utf-8", "replace")[:256]
        self._emit(_frame(GOAWAY, 0, 0, _U32.pack(self._last_stream_id) + _U32.pack(code) + debug))
        self._close()

    def _maybe_finish(self) -> None:
        """After the peer's GOAWAY (RFC 9113 §6.8): close once every open stream has been answered."""
        if (self._goaway_received or self._goaway_sent) and not self._streams:
            self._close()

    # -- input --------------------------------------------------------------------------------------------
    def _take_preface(self, data: bytes) -> bytes | None:
        """RFC 9113 §3.4: the client preface, possibly split over reads; anything else closes."""
        need = len(PREFACE) - len(self._preface)
        seen = self._preface + data[:need]
        if not PREFACE.startswith(seen):
            self._close()
            return None
        if len(seen) < len(PREFACE):
            self._preface = seen
            return None
        self._preface_done = True
        self._preface = b""
        return data[need:]

    def _receive(self, data: bytes) -> None:
        """Parse whole frames in place (RFC 9113 §4.1); keep a partial one (at most one frame) for later."""
        pos = 0
        size = len(data)
        unpack = _HEAD.unpack_from
        while size - pos >= 9 and not self._closed:  # bounded: each turn consumes at least 9 bytes
            word, flags, stream_id = unpack(data, pos)
            length = word >> 8
            if length > OUR_MAX_FRAME_SIZE:  # RFC 9113 §4.2
                raise _ConnectionError(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
            end = pos + 9 + length
            if end > size:
                break
            self._on_frame(word & 0xFF, flags, stream_id & MAX_WINDOW, data[pos + 9 : end])
            pos = end
        if pos < size and not self._closed:
            self._buffer = data[pos:]

    def _on_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._cont_stream and ftype != CONTINUATION:  # RFC 9113 §6.10
            raise _ConnectionError(PROTOCOL_ERROR, "expected CONTINUATION")
        if not self._settings_seen and (ftype != SETTINGS or flags & FLAG_ACK):  # RFC 9113 §3.4
            raise _ConnectionError(PROTOCOL_ERROR, "the client preface must end with SETTINGS")
        if ftype == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif ftype == DATA:
            self._on_data(flags, stream_id, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif ftype == PING:
            self._on_ping(flags, stream_id, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif ftype == RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif ftype == PRIORITY:  # RFC 9113 §6.3 (deprecated scheme): validated, then ignored
            if stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "PRIORITY payload is not 5 bytes")
        elif ftype == GOAWAY:
            self._on_goaway(stream_id, payload)
        elif ftype == PUSH_PROMISE:  # RFC 9113 §8.4: a client cannot push
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # RFC 9113 §4.1, §5.5: frames of unknown type are ignored.

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        """RFC 9113 §6.1/§6.2: strip the Pad Length byte and the padding."""
        if not flags & FLAG_PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(PROTOCOL_ERROR, "padding exceeds the frame payload")
        return payload[1 : len(payload) - payload[0]]

    # -- HEADERS / CONTINUATION ---------------------------------------------------------------------------
    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or not stream_id & 1:  # RFC 9113 §5.1.1: client streams are odd
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0 or on an even stream")
        block = self._unpad(flags, payload)
        if flags & FLAG_PRIORITY:  # RFC 9113 §6.2: 5 bytes of (deprecated) priority, ignored
            if len(block) < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            block = block[5:]
        end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._on_header_block(stream_id, block, end_stream)
            return
        self._check_block_size(len(block))
        self._cont_stream = stream_id
        self._cont_block = block
        self._cont_end_stream = end_stream

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not self._cont_stream or stream_id != self._cont_stream:  # RFC 9113 §6.10
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without a header block in progress")
        self._check_block_size(len(self._cont_block) + len(payload))
        # A block is at most max_header_list_bytes: concatenation stays bounded (and blocks are short).
        self._cont_block += payload
        if flags & FLAG_END_HEADERS:
            block, self._cont_block, self._cont_stream = self._cont_block, b"", 0
            self._on_header_block(stream_id, block, self._cont_end_stream)

    def _check_block_size(self, size: int) -> None:
        if size > self._limits.max_header_list_bytes:  # RFC 9113 §10.5.1
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")

    def _decode(self, block: bytes) -> _Verdict:
        """Decode a block (RFC 7541) and judge it; remember the verdict while the dynamic table holds.

        The table is unchanged when its newest entry is the same object (we hold it, so its identity
        cannot be reused), the entry count is the same and the maximum size is the same: entries are only
        added at the front, evicted from the back, or evicted by a size update (which changes the count
        unless the table was empty, and an emptied empty table is the same table).
        """
        self._check_block_size(len(block))
        table = self._decoder.header_table
        entries = table.dynamic_entries
        newest = entries[0] if entries else None
        count = len(entries)
        maxsize = table.maxsize
        try:
            headers = cast(list[tuple[bytes, bytes]], self._decoder.decode(block, raw=True))
        except hpack.OversizedHeaderListError as exc:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header list too large") from exc
        except Exception as exc:  # hpack's errors, or anything its parser trips on: the state is lost
            raise _ConnectionError(COMPRESSION_ERROR, f"HPACK decoding failed: {exc}") from exc
        verdict = _verdict(headers)
        if (entries[0] if entries else None) is newest and len(entries) == count and table.maxsize == maxsize:
            if len(self._blocks) >= self._limits.max_cached_blocks:
                self._blocks.clear()
            if self._limits.max_cached_blocks:
                self._blocks[block] = verdict
        else:
            self._blocks.clear()
        return verdict

    def _on_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        # Every block is decoded, even for a stream we refuse or forgot: HPACK state is per connection.
        verdict = self._blocks.get(block)
        if verdict is None:
            verdict = self._decode(block)
        stream = self._streams.get(stream_id)
        if stream is not None:  # a second block on an open stream: the request's trailers
            if stream.ended:
                self._reset(stream, STREAM_CLOSED)  # RFC 9113 §5.1 half-closed (remote)
            elif not end_stream:  # RFC 9113 §8.1: trailers must end the stream
                self._reset(stream, PROTOCOL_ERROR)
            else:
                stream.ended = True
                self._complete(stream)
            return
        if stream_id <= self._last_stream_id:
            # A stream already closed (answered or reset): frames in flight are ignored (RFC 9113 §5.4.2).
            return
        if self._goaway_sent:  # RFC 9113 §6.8: above our GOAWAY's last stream id: not processed
            self._emit(_frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        self._last_stream_id = stream_id
        if len(self._streams) >= self._limits.max_concurrent_streams:  # RFC 9113 §5.1.2
            self._emit(_frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        stream = _Stream(stream_id, verdict, self._limits.initial_window_size, self._peer_initial_window)
        self._streams[stream_id] = stream
        if end_stream:
            stream.ended = True
            self._complete(stream)

    # -- DATA ---------------------------------------------------------------------------------------------
    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # RFC 9113 §6.9.1: the whole payload, padding included, is flow controlled
        if size > self._recv_window:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_window -= size
        data = self._unpad(flags, payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:  # RFC 9113 §5.1: idle
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            self._recv_released += size  # a closed stream: discarded
        elif stream.ended:
            self._recv_released += size
            self._reset(stream, STREAM_CLOSED)
        elif size > stream.recv_window:
            self._recv_released += size
            self._reset(stream, FLOW_CONTROL_ERROR)  # RFC 9113 §6.9.1: a stream error
        else:
            stream.recv_window -= size
            if stream.error is None:
                self._recv_released += size - len(data)
                self._take(stream, data)
            else:
                self._recv_released += size
            if flags & FLAG_END_STREAM:
                stream.ended = True
                self._complete(stream)
            elif stream.recv_window <= self._limits.initial_window_size // 2:
                self._emit(
                    _frame(
                        WINDOW_UPDATE,
                        0,
                        stream_id,
                        _U32.pack(self._limits.initial_window_size - stream.recv_window),
                    )
                )
                stream.recv_window = self._limits.initial_window_size
        self._replenish()

    def _take(self, stream: _Stream, data: bytes) -> None:
        """Append request bytes; judge the gRPC Length-Prefixed-Message prefix as soon as it is whole."""
        body = stream.body
        body += data
        if stream.expected < 0:
            if len(body) < 5:
                return
            if body[0] != 0:  # Compressed-Flag: we accept only identity (PROTOCOL-HTTP2.md)
                self._discard(stream, (GRPC_UNIMPLEMENTED, "compressed request messages are not supported"))
                return
            length = _U32.unpack_from(body, 1)[0]
            if length > self._limits.max_message_bytes:
                self._discard(
                    stream,
                    (
                        GRPC_RESOURCE_EXHAUSTED,
                        f"request message of {length} bytes exceeds {self._limits.max_message_bytes}",
                    ),
                )
                return
            stream.expected = length
        if len(body) > stream.expected + 5:
            self._discard(stream, (GRPC_UNIMPLEMENTED, "more than one request message on a unary call"))

    def _discard(self, stream: _Stream, error: tuple[int, str]) -> None:
        stream.error = error
        self._recv_released += len(stream.body)
        stream.body = bytearray()

    def _replenish(self) -> None:
        """Give back consumed bytes to the connection window once half of it is used (RFC 9113 §6.9)."""
        released = self._recv_released
        if released and self._recv_window <= self._limits.connection_window_size // 2:
            self._emit(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(released)))
            self._recv_window += released
            self._recv_released = 0

    # -- the call -----------------------------------------------------------------------------------------
    def _complete(self, stream: _Stream) -> None:
        """The request ended (END_STREAM): answer its error, or start its method."""
        body = stream.body
        self._recv_released += len(body)
        self._replenish()
        if stream.error is not None:
            http_status = stream.verdict.http_status if stream.verdict is not None else b"200"
            self._respond_status(stream, stream.error[0], stream.error[1], http_status)
            return
        assert stream.verdict is not None  # error is None only with a verdict
        method = self._methods.get(stream.verdict.path)
        if method is None:
            self._respond_status(stream, GRPC_UNIMPLEMENTED, f"unknown method {stream.verdict.path}")
            return
        if stream.expected < 0 or len(body) != stream.expected + 5:
            self._respond_status(stream, GRPC_INTERNAL, "the request carried no complete message")
            return
        stream.body = bytearray()
        run_eagerly(self._call(stream, method, bytes(memoryview(body)[5:])))

    async def _call(self, stream: _Stream, method: UnaryMethod, message: bytes) -> None:
        try:
            reply = await method(message)
        except GrpcStatusError as exc:
            self._respond_status(stream, exc.code, exc.message)
            return
        except Exception:  # never a crash of the connection: 13 INTERNAL (PROTOCOL-HTTP2.md)
            log.exception("internal error in gRPC method %s", stream.verdict.path if stream.verdict else "")
            self._respond_status(stream, GRPC_INTERNAL, "internal error")
            return
        self._respond(stream, reply)

    def _live(self, stream: _Stream) -> bool:
        return not self._closed and self._streams.get(stream.id) is stream

    def _respond(self, stream: _Stream, reply: bytes) -> None:
        """HEADERS, DATA (the Length-Prefixed-Message), trailers with END_STREAM: one write when the
        peer's windows allow, else DATA waits for WINDOW_UPDATE (RFC 9113 §6.9)."""
        if not self._live(stream):
            return
        sid = stream.id
        size = len(reply) + 5
        headers = _frame(HEADERS, FLAG_END_HEADERS, sid, self._table_update + _RESPONSE_HEADERS)
        self._table_update = b""
        prefix = b"\x00" + _U32.pack(len(reply))
        trailers = _frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, sid, _TRAILERS_OK)
        if size <= self._send_window and size <= stream.send_window and size <= self._peer_max_frame:
            self._send_window -= size
            del self._streams[sid]
            self._emit(b"".join((headers, _HEAD.pack(size << 8 | DATA, 0, sid), prefix, reply, trailers)))
            self._maybe_finish()
            return
        self._emit(headers)
        stream.out = prefix + reply
        stream.out_end = trailers
        self._flush(stream)

    def _flush(self, stream: _Stream) -> None:
        """Send as much queued DATA as the windows allow, then the trailers once it is all out."""
        out = stream.out
        pos = stream.out_pos
        sid = stream.id
        while pos < len(out):  # bounded: each turn sends at least one byte or returns
            n = min(len(out) - pos, self._send_window, stream.send_window, self._peer_max_frame)
            if n <= 0:
                stream.out_pos = pos
                return
            self._emit(_frame(DATA, 0, sid, out[pos : pos + n]))
            self._send_window -= n
            stream.send_window -= n
            pos += n
        del self._streams[sid]
        self._emit(stream.out_end)
        self._maybe_finish()

    def _respond_status(self, stream: _Stream, code: int, message: str, http_status: bytes = b"200") -> None:
        """A Trailers-Only response (PROTOCOL-HTTP2.md) carrying a non-OK grpc-status."""
        if not self._live(stream):
            return
        del self._streams[stream.id]
        block = self._table_update + _status_block(code, message, http_status)
        self._table_update = b""
        self._emit(_frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, stream.id, block))
        self._maybe_finish()

    def _reset(self, stream: _Stream, code: int) -> None:
        """RFC 9113 §5.4.2: a stream error: RST_STREAM and forget the stream."""
        self._streams.pop(stream.id, None)
        self._recv_released += len(stream.body)
        stream.body = bytearray()
        self._emit(_frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self._maybe_finish()

    def _flush_all(self) -> None:
        for stream in list(self._streams.values()):  # bounded by max_concurrent_streams
            if stream.out_end:
                self._flush(stream)
            if self._send_window <= 0:
                return

    # -- control frames -----------------------------------------------------------------------------------
    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        """RFC 9113 §6.9: the peer grants send window, to the connection (stream 0) or one stream."""
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:  # RFC 9113 §6.9.1
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window above 2**31-1")
            self._flush_all()
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # a closed stream: allowed for a while (RFC 9113 §6.9)
        if increment == 0:
            self._reset(stream, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset(stream, FLOW_CONTROL_ERROR)
            return
        if stream.out_end:
            self._flush(stream)

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        """RFC 9113 §6.5: apply the peer's settings to our sending side, then ACK."""
        if stream_id != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6")
        self._settings_seen = True
        grew = False
        for offset in range(0, len(payload), 6):  # bounded: at most 16384 / 6 settings
            ident, value = _SETTING.unpack_from(payload, offset)
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                # Our blocks never use the dynamic table; say so at the start of the next block sent.
                self._table_update = _TABLE_SIZE_ZERO
            elif ident == SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
            elif ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2**31-1")
                delta = value - self._peer_initial_window  # RFC 9113 §6.9.2: applies to open streams
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window above 2**31-1")
                grew = grew or delta > 0
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not OUR_MAX_FRAME_SIZE <= value <= 2**24 - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            # MAX_CONCURRENT_STREAMS (we never push), MAX_HEADER_LIST_SIZE (advisory), unknown: ignored.
        self._emit(_frame(SETTINGS, FLAG_ACK, 0))
        if grew:
            self._flush_all()

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        """RFC 9113 §6.7: answer a PING with a PING ACK carrying the same 8 bytes."""
        if stream_id != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
        if not flags & FLAG_ACK:
            self._emit(_frame(PING, FLAG_ACK, 0, payload))

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        """RFC 9113 §6.4: the peer abandons a stream; we drop it and never answer it."""
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        self._recv_released += len(stream.body)
        stream.body = bytearray()
        self._replenish()
        self._maybe_finish()

    def _on_goaway(self, stream_id: int, payload: bytes) -> None:
        """RFC 9113 §6.8: the peer is leaving: finish the open streams, then close."""
        if stream_id != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnectionError(FRAME_SIZE_ERROR, "GOAWAY payload shorter than 8 bytes")
        self._goaway_received = True
        self._maybe_finish()


GrpcH2Server = GracefulServer[GrpcH2Protocol]
"""What :func:`serve_grpc_h2` returns; its ``shutdown`` sends every connection GOAWAY: Envoy sends new checks
to a fresh connection (another worker, or this authorizer once restarted) instead of seeing them reset."""


async def serve_grpc_h2(
    methods: Mapping[str, UnaryMethod],
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    limits: H2Limits = DEFAULT_LIMITS,
) -> GrpcH2Server:
    """Listen for h2c connections answering the unary ``methods`` (keys are full paths, e.g.
    ``/envoy.service.auth.v3.Authorization/Check``); unknown paths get 12 UNIMPLEMENTED."""
    table: Mapping[str, UnaryMethod] = dict(methods)
    connections: set[GrpcH2Protocol] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: GrpcH2Protocol(table, limits, connections),
        host,
        port,
        reuse_port=reuse_port or None,
        backlog=1024,
    )
    return GrpcH2Server(server, connections)

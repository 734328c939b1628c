"""HTTP/1.1 message codec for the proxy: strict parsing (httptools/llhttp) plus the checks llhttp leaves
to us.

Bytes in, events out; no sockets here. The listener and the upstream connection feed bytes and pull
:class:`RequestHead`/:class:`ResponseHead`, body chunks and end-of-message events.

What llhttp already rejects (spec ``proxy.md`` §3.1): CL+TE, duplicate or malformed Content-Length,
obs-fold, bare LF, space before colon, chunk-size overflow. What we add:

* exactly one ``Host`` in HTTP/1.1, at most one in HTTP/1.0 (RFC 9112 §3.2);
* no ``Transfer-Encoding`` in HTTP/1.0 (RFC 9112 §6.1), only ``chunked`` as transfer coding (Envoy: 501);
* header size and count limits (Envoy ``max_request_headers_kb`` 60, ``max_headers_count`` 100 ⇒ 431);
* hop-by-hop header stripping (RFC 9110 §7.6.1, RFC 2616 §13.5.1);
* re-framing: we never pass framing through, we write our own ``Content-Length`` or ``chunked``
  (RFC 9112 §6.3).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

import httptools

from authz.errors import MalformedRequest

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_HEADER_COUNT",
    "DROP_FROM_REQUEST",
    "DROP_FROM_RESPONSE",
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "Body",
    "CodecError",
    "Event",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
    "encode_chunk",
    "serialize_request_head",
    "serialize_response_head",
    "strip_hop_by_hop",
    "valid_header_name",
    "valid_header_value",
]

DEFAULT_MAX_HEADER_BYTES = 60 * 1024  # Envoy max_request_headers_kb default (60 KiB)
DEFAULT_MAX_HEADER_COUNT = 100  # Envoy max_headers_count default
FEED_SLICE = 8 * 1024  # bytes fed to llhttp at once, bounds the overshoot of the incomplete-head guard

HOP_BY_HOP = frozenset(
    {
        # RFC 9110 §7.6.1
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        # RFC 2616 §13.5.1
        "trailer",
        "trailers",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
LAST_CHUNK = b"0\r\n\r\n"

Body = Literal["none", "length", "chunked", "close"]

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Field names as they arrive -> lower-case text: clients and apps send the same few dozen names, so each is
# decoded once. Bounded (a flood of distinct names costs at most this many entries, then no caching).
MAX_CACHED_FIELD_NAMES = 4096
_field_names: dict[bytes, str] = {}


class CodecError(MalformedRequest):
    """A message we refuse to forward. ``status`` is the answer to send (400, 431, 501) before closing."""

    def __init__(self, message: str, *, status: int = 400, reason: str = "malformed_request") -> None:
        super().__init__(message, reason=reason)
        self.status = status


def valid_header_name(name: str) -> bool:
    """RFC 9110 §5.1: field-name = token."""
    return bool(name) and all(ord(c) < 128 and ord(c) in _TCHAR for c in name)


def valid_header_value(value: str) -> bool:
    """RFC 9110 §5.5: no CR, LF or NUL in a field value (those are how responses get split)."""
    return "\r" not in value and "\n" not in value and "\0" not in value


@dataclass(slots=True)
class RequestHead:
    """A parsed request line and header section. Header names are lower case, in arrival order."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    keep_alive: bool
    body: Body
    content_length: int | None = None
    expect_continue: bool = False
    host: str = ""
    """The one ``Host`` value ("" in an HTTP/1.0 request without one)."""

    def get(self, name: str) -> str | None:
        """All values of ``name`` joined with ``,`` (RFC 9110 §5.3), or None."""
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None


@dataclass(slots=True)
class ResponseHead:
    """A parsed status line and header section."""

    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    keep_alive: bool
    body: Body
    content_length: int | None = None

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None


@dataclass(slots=True)
class Event:
    """``kind`` is "head", "body", "end" or "error"; ``head``/``data``/``error`` carry the payload."""

    kind: Literal["head", "body", "end", "error"]
    head: RequestHead | ResponseHead | None = None
    data: bytes = b""
    error: CodecError | None = None


END = Event("end")
"""The end-of-message event: one shared value (events are never changed once queued)."""


class _Parser:
    """Shared callback plumbing over an httptools parser: collects :class:`Event` into a deque.

    The head being parsed lives in plain attributes (no per-message object) and each callback does the
    least it can: these run for every header of every request.
    """

    _parser: httptools.HttpRequestParser | httptools.HttpResponseParser

    def __init__(self, max_header_bytes: int, max_header_count: int) -> None:
        self.events: collections.deque[Event] = collections.deque()
        self._max_bytes = max_header_bytes
        self._max_count = max_header_count
        self._in_head = True  # until a head completes, and again once its message has ended
        self._url = b""
        self._status = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._fed_bytes = 0
        self._failed = False
        self._limit_error: CodecError | None = None

    # -- httptools callbacks (no on_message_begin: the state for the next head is reset as a head completes
    # and as a message ends, one Python call less per message) ----------------------------------------
    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._max_bytes:
            self._limit(f"header section larger than {self._max_bytes} bytes")

    def on_status(self, status: bytes) -> None:
        self._status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._header_bytes + len(name) + len(value) + 4
        self._header_bytes = size
        if size > self._max_bytes:
            self._limit(f"header section larger than {self._max_bytes} bytes")
        if not self._in_head:
            return  # a chunked body's trailer section: not forwarded (Envoy's HTTP/1 default)
        headers = self._headers
        if len(headers) >= self._max_count:
            self._limit(f"more than {self._max_count} header fields")
        key = _field_names.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_field_names) < MAX_CACHED_FIELD_NAMES:
                _field_names[name] = key
        headers.append((key, value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.events.append(Event("body", None, body))

    def on_message_complete(self) -> None:
        self.events.append(END)
        self._in_head = True
        self._header_bytes = 0
        self._fed_bytes = 0

    # -- helpers -------------------------------------------------------------------------------------
    def _limit(self, message: str) -> None:
        self._limit_error = CodecError(message, status=431, reason="headers_too_large")
        raise self._limit_error

    def feed(self, data: bytes) -> None:
        """Parse ``data``; complete messages' events are queued on :attr:`events`."""
        if self._failed:
            return
        if len(data) <= FEED_SLICE:
            self._feed_piece(data)
            return
        for start in range(0, len(data), FEED_SLICE):
            if not self._feed_piece(data[start : start + FEED_SLICE]):
                return

    def _feed_piece(self, piece: bytes) -> bool:
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            self._fail(CodecError("protocol upgrade and CONNECT are not supported", status=501))
            return False
        except httptools.HttpParserCallbackError as exc:
            cause = self._limit_error or exc.__context__
            if isinstance(cause, CodecError):
                self._fail(cause)
            else:
                self._fail(CodecError(f"invalid message: {cause or exc}"))
            return False
        except httptools.HttpParserError as exc:
            self._fail(CodecError(f"invalid message: {exc}"))
            return False
        if self._in_head:
            # llhttp buffers an incomplete header line without telling us; bound it ourselves.
            self._fed_bytes += len(piece)
            if self._fed_bytes > self._max_bytes + FEED_SLICE:
                self._fail(
                    CodecError(
                        f"header section larger than {self._max_bytes} bytes",
                        status=431,
                        reason="headers_too_large",
                    )
                )
                return False
        return True

    def _fail(self, error: CodecError) -> None:
        self._failed = True
        self.events.append(Event("error", error=error))

    @property
    def failed(self) -> bool:
        return self._failed


def _framing(te: list[str], cl: list[str], version: str, *, request: bool) -> tuple[Body, int | None]:
    """Decide the body framing (RFC 9112 §6.1-6.3) from the ``Transfer-Encoding`` and ``Content-Length``
    values, and reject the shapes used for smuggling."""
    if te and cl:  # RFC 9112 §6.3 ¶3: reject rather than guess (llhttp already does)
        raise CodecError("both Content-Length and Transfer-Encoding")
    if len(cl) > 1:
        raise CodecError("several Content-Length fields")
    if te:
        if version == "1.0" and request:  # RFC 9112 §6.1: TE in HTTP/1.0 is a smuggling vector
            raise CodecError("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in ",".join(te).split(",") if c.strip()]
        if codings != ["chunked"]:
            raise CodecError(f"unsupported transfer coding {','.join(te)!r}", status=501)
        return "chunked", None
    if cl:
        value = cl[0].strip()
        if not value.isdigit() or len(value) > 18:
            raise CodecError("malformed Content-Length")
        n = int(value)
        return ("length" if n else "none"), n
    return ("none" if request else "close"), None


# Header names the request checks look at; every other name is skipped with one set lookup.
_REQUEST_SPECIAL = frozenset({"host", "transfer-encoding", "content-length", "expect", "upgrade"})
_FRAMING_FIELDS = frozenset({"transfer-encoding", "content-length"})


class RequestParser(_Parser):
    """Parse pipelined requests from a downstream connection; :attr:`events` fills as bytes arrive."""

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_header_count: int = DEFAULT_MAX_HEADER_COUNT,
    ) -> None:
        super().__init__(max_header_bytes, max_header_count)
        self._parser: httptools.HttpRequestParser = httptools.HttpRequestParser(self)

    def on_headers_complete(self) -> None:
        self._in_head = False
        url, headers = self._url, self._headers
        self._url = b""
        self._headers = []
        parser = self._parser
        version = parser.get_http_version()
        method = parser.get_method().decode("ascii")
        special = [field for field in headers if field[0] in _REQUEST_SPECIAL]
        if len(special) == 1 and special[0][0] == "host" and method != "CONNECT":
            # The usual request: one Host, no body, no expectation, no upgrade.
            host = special[0][1]
            if "\r" in host or "\n" in host or "\0" in host:  # valid_header_value, inlined
                raise CodecError("malformed Host")
            body: Body = "none"
            length = None
            expect = False
        else:
            host, body, length, expect = _checked_request(method, version, special)
        self.events.append(
            Event(
                "head",
                RequestHead(
                    method,
                    url.decode("latin-1"),
                    version,
                    headers,
                    bool(parser.should_keep_alive()),
                    body,
                    length,
                    expect,
                    host,
                ),
            )
        )


def _checked_request(
    method: str, version: str, special: list[tuple[str, str]]
) -> tuple[str, Body, int | None, bool]:
    """The checks on a request head's ``Host``, framing, ``Expect`` and ``Upgrade`` fields (``special``, in
    arrival order): (host, body framing, length, expects 100-continue). Raises :class:`CodecError`."""
    hosts: list[str] = []
    te: list[str] = []
    cl: list[str] = []
    expect: list[str] = []
    upgrade = False
    for k, v in special:
        if k == "host":
            hosts.append(v)
        elif k == "content-length":
            cl.append(v)
        elif k == "transfer-encoding":
            te.append(v)
        elif k == "expect":
            expect.append(v.strip().lower())
        else:
            upgrade = True
    if method == "CONNECT" or upgrade:
        # No tunnel mode yet; Envoy also refuses upgrades it was not configured for.
        raise CodecError("protocol upgrade and CONNECT are not supported", status=501)
    if (version == "1.1" and len(hosts) != 1) or len(hosts) > 1:
        raise CodecError("a request needs exactly one Host header (RFC 9112 §3.2)")
    if hosts and not valid_header_value(hosts[0]):
        raise CodecError("malformed Host")
    body, length = _framing(te, cl, version, request=True)
    if expect and expect != ["100-continue"]:
        raise CodecError("unsupported expectation", status=417)
    return (hosts[0] if hosts else ""), body, length, bool(expect)


class ResponseParser(_Parser):
    """Parse responses from an upstream connection. 1xx responses arrive as complete messages of their own."""

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_header_count: int = DEFAULT_MAX_HEADER_COUNT,
    ) -> None:
        super().__init__(max_header_bytes, max_header_count)
        self._parser: httptools.HttpResponseParser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self._in_head = False
        reason, headers = self._status, self._headers
        self._status = b""
        self._headers = []
        parser = self._parser
        status = int(parser.get_status_code())
        version = parser.get_http_version()
        if 100 <= status < 200 or status in (204, 304):
            body: Body = "none"
            length = None
        else:
            te: list[str] = []
            cl: list[str] = []
            for k, v in [field for field in headers if field[0] in _FRAMING_FIELDS]:
                (te if k == "transfer-encoding" else cl).append(v)
            body, length = _framing(te, cl, version, request=False)
        self.events.append(
            Event(
                "head",
                ResponseHead(
                    status,
                    reason.decode("latin-1"),
                    version,
                    headers,
                    bool(parser.should_keep_alive()),
                    body,
                    length,
                ),
            )
        )


DROP_FROM_RESPONSE = HOP_BY_HOP | {"content-length"}
"""Fields a proxy never forwards from a response: hop-by-hop ones and framing (it re-frames)."""
DROP_FROM_REQUEST = DROP_FROM_RESPONSE | {"host", "expect"}
"""Request fields not forwarded as they are: Host travels as the authority, Expect is answered here."""


_CONNECTION_FIELDS = frozenset({"connection", "proxy-connection"})


def strip_hop_by_hop(
    headers: list[tuple[str, str]], drop: frozenset[str] = DROP_FROM_RESPONSE
) -> list[tuple[str, str]]:
    """Drop hop-by-hop fields and every field named in ``Connection`` (RFC 9110 §7.6.1).

    Framing fields (``content-length``) are dropped too: the writer re-frames (RFC 9112 §6.3). ``drop``
    names further fields to leave out (:data:`DROP_FROM_REQUEST`).
    """
    named = [v for k, v in headers if k in _CONNECTION_FIELDS]
    if named:
        drop = drop | {token.strip().lower() for v in named for token in v.split(",")}
    return [(k, v) for k, v in headers if k not in drop]


def _head_lines(first: str, headers: list[tuple[str, str]]) -> bytes:
    return (first + "\r\n" + "".join([f"{k}: {v}\r\n" for k, v in headers]) + "\r\n").encode("latin-1")


def serialize_request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """The request line and headers; the caller has already put ``host`` and the framing fields in."""
    return _head_lines(f"{method} {target} HTTP/1.1", headers)


def serialize_response_head(
    status: int, reason: str, headers: list[tuple[str, str]], version: str = "1.1"
) -> bytes:
    return _head_lines(f"HTTP/{version} {status} {reason or 'Unknown'}", headers)


def encode_chunk(data: bytes) -> bytes:
    """One chunk of the chunked transfer coding (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)

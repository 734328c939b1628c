"""Requests and responses as they flow ``router -> cluster -> pool -> connection``, with streaming bodies.

A body is read with ``await body.read()`` (``None`` at the end). Request bodies up to the replay limit are
buffered so retries and mirrors can send them again; larger ones stream once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "REASON_PHRASES",
    "BytesBody",
    "ProxyRequest",
    "ProxyResponse",
    "RequestBody",
    "ResponseBody",
    "StreamInfo",
    "local_response",
    "reason_phrase",
]


class ResponseBody(Protocol):
    async def read(self) -> bytes | None:
        """The next chunk; None at the end."""
        ...

    def poll(self) -> bytes | None:
        """The next chunk if it is already here, ``b""`` if it is not yet, None at the end (no waiting).

        Lets the listener send a response head and its body in one write.
        """
        ...

    def take_all(self) -> bytes | None:
        """The whole rest of the body when all of it is here already (the body is then done), else None
        and nothing taken. Lets the listener answer a small response without waiting."""
        ...

    def abort(self) -> None: ...


class BytesBody:
    """A body already in memory (local replies, replayed request bodies)."""

    def __init__(self, data: bytes = b"") -> None:
        self._data: bytes | None = data if data else None

    async def read(self) -> bytes | None:
        data, self._data = self._data, None
        return data

    def poll(self) -> bytes | None:
        data, self._data = self._data, None
        return data

    def take_all(self) -> bytes | None:
        data, self._data = self._data, None
        return data or b""

    def abort(self) -> None:
        self._data = None


class RequestBody:
    """The downstream request body. ``length``: exact size, or None for a chunked body of unknown size.

    ``read_source`` pulls the next decoded chunk from the downstream connection (None at the end).
    """

    def __init__(self, length: int | None, read_source: Callable[[], Awaitable[bytes | None]] | None) -> None:
        self.length = length
        self._source = read_source
        self._prefix: list[bytes] = []
        self.buffered: bytes | None = b"" if read_source is None else None
        self.consumed = False

    @property
    def empty(self) -> bool:
        return self.length == 0 or self._source is None

    async def buffer(self, limit: int) -> bool:
        """Read up to ``limit`` bytes ahead; True (and :attr:`buffered` set) if the whole body fit."""
        if self.buffered is not None:
            return True
        assert self._source is not None
        if self.length is not None and self.length > limit:
            return False
        size = 0
        while size <= limit:
            chunk = await self._source()
            if chunk is None:
                self.buffered = b"".join(self._prefix)
                self._prefix = []
                return True
            self._prefix.append(chunk)
            size += len(chunk)
        return False

    def replay(self) -> BytesBody:
        assert self.buffered is not None
        return BytesBody(self.buffered)

    async def read(self) -> bytes | None:
        """Stream once: the buffered prefix first, then the rest from the connection."""
        if self.buffered is not None:
            raise RuntimeError("a buffered body is sent with replay()")
        self.consumed = True
        if self._prefix:
            return self._prefix.pop(0)
        if self._source is None:
            return None
        return await self._source()

    def abort(self) -> None:
        self._prefix = []


@dataclass(slots=True)
class ProxyRequest:
    """A request being proxied. ``headers`` are end-to-end only (no Host, framing or hop-by-hop fields)."""

    method: str
    target: str
    authority: str
    headers: list[tuple[str, str]]
    body: RequestBody
    scheme: str = "http"
    version: str = "1.1"

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None


@dataclass(slots=True)
class ProxyResponse:
    """A response to send downstream. ``length`` None = unknown (chunked); ``no_body`` for HEAD/204/304."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: ResponseBody
    length: int | None = None
    no_body: bool = False


@dataclass(slots=True)
class StreamInfo:
    """What the access log and metrics need about one request (Envoy's stream info)."""

    start: float
    flags: set[str] = field(default_factory=set)
    upstream_host: str = ""
    upstream_cluster: str = ""
    route_name: str = ""
    request_id: str = ""
    bytes_received: int = 0
    bytes_sent: int = 0
    status: int = 0
    attempts: int = 0


REASON_PHRASES = {
    # Envoy's ``CodeUtility::toString`` (source/common/http/codes.cc): the phrase Envoy writes on every
    # HTTP/1 status line, its own replies and proxied responses alike (an upstream's phrase is not kept;
    # checked against Envoy 1.40 in test_proxy_reason_oracle.py). Any other code is "Unknown".
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    202: "Accepted",
    203: "Non-Authoritative Information",
    204: "No Content",
    205: "Reset Content",
    206: "Partial Content",
    207: "Multi-Status",
    208: "Already Reported",
    226: "IM Used",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    305: "Use Proxy",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Payload Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    417: "Expectation Failed",
    421: "Misdirected Request",
    422: "Unprocessable Entity",
    423: "Locked",
    424: "Failed Dependency",
    425: "Too Early",
    426: "Upgrade Required",
    428: "Precondition Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
    506: "Variant Also Negotiates",
    507: "Insufficient Storage",
    508: "Loop Detected",
    510: "Not Extended",
    511: "Network Authentication Required",
    599: "Last Unassigned Server Error Code",
}


def reason_phrase(status: int) -> str:
    """The reason phrase Envoy writes for ``status`` (:data:`REASON_PHRASES`, else "Unknown")."""
    return REASON_PHRASES.get(status, "Unknown")


def local_response(
    status: int,
    body: bytes | str = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    content_type: str = "text/plain",
) -> ProxyResponse:
    """A reply the proxy makes itself (404 NR, 503 UF, 504 UT, a deny, a fault abort)."""
    data = body.encode() if isinstance(body, str) else body
    hdrs = list(headers or [])
    if data and not any(k == "content-type" for k, _ in hdrs):
        hdrs.append(("content-type", content_type))
    return ProxyResponse(status, reason_phrase(status), hdrs, BytesBody(data), length=len(data))

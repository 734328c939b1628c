"""HTTP ext_authz front (Envoy ``http_service``): lean asyncio + ``httptools``, no web framework.

Envoy sends the original method, ``path_prefix`` + original path and the allowed headers (always
``Host``, ``Authorization``, ``:method``, ``:path``, ``Content-Length``; more through ``allowed_headers``).
Whatever Envoy adds through ``authorization_request.headers_to_add`` overrides the client's value of the
same name, so those are the only headers we trust for facts the client must not choose: the
``x-authz-*`` headers below, which the documented Envoy config sets from its connection (peer principal,
addresses, workload scope). They are honoured only when ``trust_envoy_headers`` is on, and only in the
form Envoy writes them: prefixed with ``+`` (Envoy skips a header whose formatted value is empty, so an
unprefixed value could be the client's own copy; the marker keeps Envoy's value non-empty and therefore
always overriding). A value without the marker is dropped.

Answer: 200 = allow (headers to set upstream ride on the response; ``x-envoy-auth-headers-to-remove``
lists headers Envoy removes); 401/403 (or 400) = deny with our JSON body and headers. 5xx is never used
for a decision: Envoy treats it as an authorizer failure (``failure_mode_allow``). Internal errors deny.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import unquote

import httptools

from authz.decision import Decision, HeaderOps, value_builder
from authz.errors import MalformedRequest
from authz.metrics import INTERNAL_ERRORS
from authz.request import EMPTY_MAP, HttpAttributes, Peer, Request
from authz.server.graceful import GracefulServer
from authz.server.grpc_ext_authz import Checker, denied_body, internal_error_decision
from authz.server.limits import MAX_HEADER_COUNT, MAX_HEADERS_BYTES, MAX_PATH_BYTES

__all__ = [
    "TRUSTED_HEADERS",
    "CheckerNow",
    "HttpCheckServer",
    "HttpCheckSettings",
    "HttpExtAuthzProtocol",
    "TranslationMemo",
    "serve_http",
]

log = logging.getLogger("authz.server.http")

# Headers Envoy sets through authorization_request.headers_to_add (they override client values).
H_SOURCE_PRINCIPAL = "x-authz-source-principal"
H_SOURCE_ADDRESS = "x-authz-source-address"
H_DESTINATION_ADDRESS = "x-authz-destination-address"
H_DESTINATION_PRINCIPAL = "x-authz-destination-principal"
H_PEER_CERTIFICATE = "x-authz-peer-certificate"
H_SNI = "x-authz-sni"
H_NAMESPACE = "x-authz-namespace"
H_LABELS = "x-authz-labels"
TRUSTED_HEADERS = (
    H_SOURCE_PRINCIPAL,
    H_SOURCE_ADDRESS,
    H_DESTINATION_ADDRESS,
    H_DESTINATION_PRINCIPAL,
    H_PEER_CERTIFICATE,
    H_SNI,
    H_NAMESPACE,
    H_LABELS,
)
TRUSTED_VALUE_MARKER = "+"
_TRUSTED_SET = frozenset(TRUSTED_HEADERS)
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "expect"})
# A check request carries no body unless Envoy is configured to buffer one; cap what we accept.
MAX_BODY_BYTES = 1024 * 1024
# Everything one check request may make us hold: headers, path, body, and room for the request line.
MAX_MESSAGE_BYTES = MAX_HEADERS_BYTES + MAX_PATH_BYTES + MAX_BODY_BYTES + 4096
_TOO_LARGE_HEAD = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)
_TOO_LARGE_BODY = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_NO_PEER = Peer()
CheckerNow = Callable[[Request], Decision | None]
"""Decides a check now, or returns None when deciding it must wait (:meth:`authz.engine.Engine.check_now`)."""
# Request(...) and HttpAttributes(...) at half the cost: one of each per check.
_build_request = value_builder(Request)
_build_http = value_builder(HttpAttributes)


@dataclass(frozen=True, slots=True)
class HttpCheckSettings:
    path_prefix: str = ""
    """Envoy's ``http_service.path_prefix``, stripped from the path before deciding."""
    trust_envoy_headers: bool = True
    """Honour ``x-authz-*`` headers (set by Envoy's ``headers_to_add``); off = ignore and strip them."""


def _split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, 0
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        return value, 0


# Connection facts derived from the trusted headers (peers, SNI, workload scope), kept by the headers'
# values: behind one Envoy they repeat per downstream connection. Dropped whole when full.
MAX_CACHED_FACTS = 1024
_Facts = tuple[Peer, Peer, str, Mapping[str, str]]
_facts_cache: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[str, int] | None], _Facts] = {}
_NO_EXTENSIONS: Mapping[str, str] = MappingProxyType({})


def _trusted_facts(trusted: Mapping[str, str], peer: tuple[str, int]) -> _Facts:
    """Source and destination peers, SNI and context extensions from Envoy's marked headers."""
    facts = {k: v[1:] for k, v in trusted.items() if v.startswith(TRUSTED_VALUE_MARKER)}
    get = facts.get
    cert = get(H_PEER_CERTIFICATE, "")
    src_addr = get(H_SOURCE_ADDRESS, "")
    address, port = _split_hostport(src_addr) if src_addr else peer
    src = Peer(
        address=address,
        port=port,
        principal=get(H_SOURCE_PRINCIPAL, ""),
        certificate=unquote(cert) if cert else "",
    )
    dst_addr = get(H_DESTINATION_ADDRESS, "")
    d_address, d_port = _split_hostport(dst_addr) if dst_addr else ("", 0)
    dst = Peer(address=d_address, port=d_port, principal=get(H_DESTINATION_PRINCIPAL, ""))
    ext: dict[str, str] = {}
    namespace = get(H_NAMESPACE)
    if namespace is not None:
        ext["namespace"] = namespace
    labels = get(H_LABELS)
    if labels is not None:
        ext["labels"] = labels
    return src, dst, get(H_SNI, ""), MappingProxyType(ext) if ext else _NO_EXTENSIONS


def build_request(
    method: str,
    raw_path: str,
    headers: dict[str, str],
    *,
    peer: tuple[str, int],
    settings: HttpCheckSettings,
    trusted: Mapping[str, str] | None = None,
) -> Request:
    """Translate one HTTP check request into a :class:`Request`. Raises :class:`MalformedRequest`.

    ``trusted`` holds the ``x-authz-*`` headers (when None they are taken out of ``headers``); only
    values carrying Envoy's ``+`` marker count, and only with ``settings.trust_envoy_headers``.
    """
    if trusted is None:
        trusted = {name: headers.pop(name) for name in TRUSTED_HEADERS if name in headers}
    if settings.trust_envoy_headers and trusted:
        # The facts are a pure function of the headers (and of the connection's peer address unless
        # Envoy sent the source address, marked), so equal headers share one immutable value.
        marked_source = trusted.get(H_SOURCE_ADDRESS, "").startswith(TRUSTED_VALUE_MARKER)
        key = (tuple(trusted), tuple(trusted.values()), None if marked_source else peer)
        facts = _facts_cache.get(key)
        if facts is None:
            facts = _trusted_facts(trusted, peer)
            if len(_facts_cache) >= MAX_CACHED_FACTS:
                _facts_cache.clear()
            _facts_cache[key] = facts
    else:
        facts = (Peer(address=peer[0], port=peer[1]), _NO_PEER, "", _NO_EXTENSIONS)
    return _assemble(method, raw_path, headers, facts, settings)


def _assemble(
    method: str, raw_path: str, headers: dict[str, str], facts: _Facts, settings: HttpCheckSettings
) -> Request:
    """The :class:`Request` for a check whose headers are decoded and whose connection facts are known."""
    path = raw_path
    if settings.path_prefix and path.startswith(settings.path_prefix):
        path = path[len(settings.path_prefix) :] or "/"
    src, dst, sni, ext = facts
    host = headers.get("host", "")
    headers[":authority"] = host
    headers[":method"] = method
    headers[":path"] = path
    return _build_request(
        source=src,
        destination=dst,
        # llhttp already enforced RFC 9110 token and field-value syntax on every header.
        http=_build_http(method=method, host=host, path=path, headers=headers, validated=True),
        sni=sni,
        context_extensions=ext,
        metadata=EMPTY_MAP,  # given: a default factory is one more Python call per check
    )


# -- Header fields, decoded per message -----------------------------------------------------------------
# llhttp has already split every field line into name and value (RFC 9112 §5: leading OWS dropped, no
# obs-fold, RFC 9110 §5.1/§5.5 token and field-value syntax enforced), so the parser callback only records
# the raw pairs, and each message is decoded at once: lower-case names, UTF-8 values, hop-by-hop fields
# dropped, the ``x-authz-*`` apart, two fields of one name joined with "," (RFC 9110 §5.3). Envoy sends the
# same names in the same order on every check, so how to decode a sequence of names is worked out once
# (a :class:`_HeaderPlan`) and the values of each message go through it in a few C-level calls.
_RAW_LIMIT = 2 * (MAX_HEADER_COUNT + 1)  # flat name, value list: keeping one header past the limit shows it
MAX_CACHED_PLANS = 256  # distinct header-name sequences; junk ones cost at most this many, dropped whole
MAX_CACHED_RAW_FACTS = MAX_CACHED_FACTS


def _picker(indices: Sequence[int]) -> Callable[[Sequence[bytes]], tuple[bytes, ...]]:
    """``lambda items: tuple(items[i] for i in indices)`` as one C-level call (``itemgetter``)."""
    if not indices:
        return lambda items: ()
    if len(indices) == 1:
        only = indices[0]
        return lambda items: (items[only],)
    return itemgetter(*indices)


@dataclass(frozen=True, slots=True)
class _HeaderPlan:
    """How to decode the flat ``[name, value, ...]`` list of one sequence of header names."""

    plain_keys: tuple[str, ...]
    plain_values: Callable[[Sequence[bytes]], tuple[bytes, ...]]
    trusted_keys: tuple[str, ...]
    trusted_values: Callable[[Sequence[bytes]], tuple[bytes, ...]]


_plans: dict[tuple[bytes, ...], _HeaderPlan | None] = {}
_raw_facts_cache: dict[tuple[tuple[str, ...], tuple[bytes, ...], tuple[str, int]], _Facts] = {}


def _plan_for(names: tuple[bytes, ...]) -> _HeaderPlan | None:
    """The plan for ``names`` (memoized), or None when a name repeats: those take the one-by-one path."""
    if names in _plans:
        return _plans[names]
    plain: list[tuple[int, str]] = []
    trusted: list[tuple[int, str]] = []
    seen: set[str] = set()
    plan: _HeaderPlan | None = None
    for position, name in enumerate(names):
        key = name.decode("ascii", "replace").lower()
        if not name.isascii() or key in seen:
            break
        seen.add(key)
        if key in _HOP_HEADERS:
            continue
        (trusted if key in _TRUSTED_SET else plain).append((2 * position + 1, key))
    else:
        plan = _HeaderPlan(
            plain_keys=tuple(k for _, k in plain),
            plain_values=_picker([i for i, _ in plain]),
            trusted_keys=tuple(k for _, k in trusted),
            trusted_values=_picker([i for i, _ in trusted]),
        )
    if len(_plans) >= MAX_CACHED_PLANS:
        _plans.clear()
    _plans[names] = plan
    return plan


def _texts(values: tuple[bytes, ...]) -> list[str]:
    """The UTF-8 text of each value (raises ``UnicodeDecodeError``): joined, decoded and split again,
    three C-level calls. Field values never hold LF (llhttp refuses it), so the split gives them back;
    and UTF-8 is self-synchronizing, so the join decodes iff every value does."""
    if not values:
        return []
    texts = b"\n".join(values).decode("utf-8").split("\n")
    if len(texts) != len(values):  # not reachable behind llhttp; decode one by one rather than guess
        texts = [value.decode("utf-8") for value in values]
    return texts


def _decode_one_by_one(raw: Sequence[bytes]) -> tuple[dict[str, str], dict[str, str]]:
    """Plain and ``x-authz-*`` headers of a flat ``[name, value, ...]`` list, field by field (the path for
    repeated names, and the reference the planned path must equal). Raises ``UnicodeDecodeError``."""
    headers: dict[str, str] = {}
    trusted: dict[str, str] = {}
    for position in range(0, len(raw), 2):
        key = raw[position].decode("ascii").lower()  # llhttp admits only token characters in names
        if key in _HOP_HEADERS:
            continue
        text = raw[position + 1].decode("utf-8")
        target = trusted if key in _TRUSTED_SET else headers
        prev = target.get(key)
        target[key] = text if prev is None else f"{prev},{text}"
    return headers, trusted


def request_from_fields(
    method: str,
    raw_path: str,
    raw: Sequence[bytes],
    *,
    peer: tuple[str, int],
    settings: HttpCheckSettings,
    planned: bool = True,
    size_bound: int | None = None,
) -> Request:
    """:func:`build_request` from the raw header fields of one message, a flat ``[name, value, ...]`` list
    as llhttp split them. Raises :class:`MalformedRequest` (too many or too large headers, non-UTF-8
    values). ``planned=False`` decodes field by field: same answer, the reference for tests.
    ``size_bound``: bytes the caller knows the fields fit in (the one read the whole message came in);
    at most ``MAX_HEADERS_BYTES``, it spares summing them."""
    if len(raw) > 2 * MAX_HEADER_COUNT or (
        (size_bound is None or size_bound > MAX_HEADERS_BYTES) and len(b"".join(raw)) > MAX_HEADERS_BYTES
    ):
        raise MalformedRequest("request headers too large")
    plan = _plan_for(tuple(raw[0::2])) if planned else None
    try:
        if plan is None:
            headers, trusted = _decode_one_by_one(raw)
            return build_request(method, raw_path, headers, peer=peer, settings=settings, trusted=trusted)
        # The plan's keys and the values it picks are as many (no strict= either: a keyword costs here).
        headers = dict(zip(plan.plain_keys, _texts(plan.plain_values(raw))))  # noqa: B905
        keys = plan.trusted_keys
        values = plan.trusted_values(raw)
        if settings.trust_envoy_headers and keys:
            # Facts by the raw bytes of Envoy's headers (and the peer): a hit needs no decoding, and
            # only values that decoded are ever stored.
            key = (keys, values, peer)
            facts = _raw_facts_cache.get(key)
            if facts is None:
                facts = _trusted_facts(dict(zip(keys, _texts(values), strict=False)), peer)
                if len(_raw_facts_cache) >= MAX_CACHED_RAW_FACTS:
                    _raw_facts_cache.clear()
                _raw_facts_cache[key] = facts
        else:
            _texts(values)  # ignored, but a value that is not UTF-8 is still refused
            facts = (Peer(address=peer[0], port=peer[1]), _NO_PEER, "", _NO_EXTENSIONS)
    except UnicodeDecodeError:
        raise MalformedRequest("header is not valid UTF-8") from None
    return _assemble(method, raw_path, headers, facts, settings)


_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden"}


def _header_line(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("latin-1", "replace")


# The head of an allow up to its decision id, by HeaderOps value: the engine shares one HeaderOps per
# cached credential, so this is built once per identity. Held with its key object; dropped whole when full.
MAX_CACHED_ALLOW_HEADS = 1024
_allow_heads: dict[tuple[int, bool], tuple[HeaderOps, bytes]] = {}


def _allow_head(ops: HeaderOps, keep_alive: bool) -> bytes:
    entry = _allow_heads.get((id(ops), keep_alive))
    if entry is not None and entry[0] is ops:
        return entry[1]
    parts = [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n", b"" if keep_alive else b"connection: close\r\n"]
    for k, v in ops.set:
        parts.append(_header_line(k, v))
    for k, v in ops.append:
        parts.append(_header_line(k, v))
    if ops.remove:
        parts.append(_header_line("x-envoy-auth-headers-to-remove", ",".join(ops.remove)))
    for k, v in ops.response:
        parts.append(_header_line(k, v))
    head = b"".join(parts)
    if len(_allow_heads) >= MAX_CACHED_ALLOW_HEADS:
        _allow_heads.clear()
    _allow_heads[(id(ops), keep_alive)] = (ops, head)  # held: its id stays unique while cached
    return head


def encode_response(decision: Decision, *, keep_alive: bool) -> bytes:
    """The HTTP/1.1 response Envoy's HTTP ext_authz client reads for this decision."""
    if decision.allowed:
        return b"%sx-authz-decision-id: %s\r\n\r\n" % (
            _allow_head(decision.headers, keep_alive),
            decision.decision_id.encode("latin-1", "replace"),
        )
    conn = b"" if keep_alive else b"connection: close\r\n"
    body = denied_body(decision).encode("utf-8")
    status = decision.status if 400 <= decision.status < 500 else 403
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Denied")),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        conn,
        _header_line("x-authz-decision-id", decision.decision_id),
    ]
    if decision.www_authenticate:
        head.append(_header_line("www-authenticate", decision.www_authenticate))
    head.append(b"\r\n")
    return b"".join(head) + body


# -- The translation memo --------------------------------------------------------------------------------
# Behind one Envoy, consecutive checks repeat their bytes except a request id and trace context. A read that
# held exactly one whole check without a body is remembered (from the second time its key is seen) by its
# bytes with those values cut out, with the Request it translated to; a later read equal to it but for
# those values is answered with that Request: no parsing, decoding or building. Sound because:
# (1) only the values of headers the engine says no check reads (Engine.ignorable_headers) are left out,
#     and only while it still says so;
# (2) equal remaining bytes at equal positions frame the same single message (a cut value holds no CR or
#     LF), so the Request is the one the parser would build but for those values;
# (3) a cut value must be printable ASCII (what llhttp and the UTF-8 decoding accept, and less), and the
#     read no larger than the header limit;
# (4) it is decided at once, in the same callback (no reload in between), by Engine.check_again
#     (check_now for a request value seen before); a check that must wait takes the full path.
MAX_MEMO_ENTRIES = 1024
MAX_MEMO_SEEN = 4096  # hashes of keys seen once (ints), dropped whole when full
_NOT_PLAIN = re.compile(rb"[^\t\x20-\x7e]")  # what a cut value may not hold: controls, DEL, non-ASCII


class TranslationMemo:
    """Reads of one whole check, by their bytes less the values of ignorable headers, and the Request each
    translated to (see the comment above); shared by the connections of one server (one ``settings``).

    Kept by the key's hash, the key held in the entry and compared on a hit. A key is kept from its second
    sight on: a stream of checks that never repeat (a new path each time) keeps no requests alive and
    costs only the key and its hash per read."""

    __slots__ = ("_ignorable", "_seen", "check_again", "entries", "names")

    def __init__(self, ignorable: Callable[[], frozenset[str]], check_again: CheckerNow) -> None:
        self._ignorable = ignorable  # Engine.ignorable_headers
        self.check_again = check_again  # Engine.check_again: check_now for a request value seen before
        self.names: frozenset[str] = frozenset()
        self.entries: dict[int, _MemoEntry] = {}
        self._seen: set[int] = set()  # hashes of keys seen once

    def ignorable_now(self) -> frozenset[str]:
        """The engine's ignorable headers now; when they changed, every entry is dropped."""
        names = self._ignorable()
        if names is not self.names:
            if names != self.names:
                self.entries.clear()
                self._seen.clear()
            self.names = names
        return names

    def seen_before(self, hashed: int) -> bool:
        """Whether a key of this hash was looked up before (and note it now)."""
        seen = self._seen
        if hashed in seen:
            return True
        if len(seen) >= MAX_MEMO_SEEN:
            seen.clear()
        seen.add(hashed)
        return False

    def store(
        self,
        key: tuple[object, ...],
        hashed: int,
        request: Request,
        keep_alive: bool,
        peer: tuple[str, int],
    ) -> None:
        # A source taken from the connection (no marked source address from Envoy) binds the entry to it.
        bound = peer if (request.source.address, request.source.port) == peer else None
        if len(self.entries) >= MAX_MEMO_ENTRIES:
            self.entries.clear()
        self.entries[hashed] = (key, request, keep_alive, bound)


# key, the Request it translated to, keep-alive, the peer it is bound to (or None)
_MemoEntry = tuple[tuple[object, ...], Request, bool, tuple[str, int] | None]


def _value_span(data: bytes, needle: bytes, start: int) -> tuple[int, int] | None:
    """Where the value of the first ``needle`` line from ``start`` begins and ends, or None when there is
    none or the value is not plain (see :data:`_NOT_PLAIN`)."""
    at = data.find(needle, start)
    if at < 0:
        return None
    value_at = at + len(needle)
    end = data.find(b"\r\n", value_at)
    if end < 0 or _NOT_PLAIN.search(data, value_at, end) is not None:
        return None
    return value_at, end


def _memo_key(data: bytes, needles: tuple[bytes, ...]) -> tuple[object, ...] | None:
    """``data`` cut around the value of each ``needles`` line (``\r\n<name>:``, in order), or None when one
    is missing or its value is not plain."""
    if len(needles) == 1:  # the usual case (a request id alone), without the list
        span = _value_span(data, needles[0], 0)
        return None if span is None else (needles, data[: span[0]], data[span[1] :])
    parts: list[object] = [needles]
    start = 0
    for needle in needles:
        span = _value_span(data, needle, start)
        if span is None:
            return None
        parts.append(data[start : span[0]])
        start = span[1]
    parts.append(data[start:])
    return tuple(parts)


class HttpExtAuthzProtocol(asyncio.Protocol):
    """One connection from Envoy's HTTP ext_authz client. Requests are answered in order."""

    # Slots: the parser callbacks read and write these on every header of every check.
    __slots__ = (
        "_bad_header",
        "_begun_in",
        "_body_bytes",
        "_check",
        "_check_now",
        "_closing",
        "_draining",
        "_error",
        "_in_body",
        "_in_message",
        "_learn",
        "_malformed",
        "_memo",
        "_memo_hash",
        "_memo_hit",
        "_memo_key",
        "_needles",
        "_needles_for",
        "_parser",
        "_peer",
        "_planned",
        "_queue",
        "_raw",
        "_read_size",
        "_reads",
        "_received",
        "_registry",
        "_settings",
        "_stopping",
        "_transport",
        "_url",
    )

    def __init__(
        self,
        check: Checker,
        settings: HttpCheckSettings,
        malformed: Callable[[MalformedRequest], Decision],
        registry: set[HttpExtAuthzProtocol] | None = None,
        *,
        check_now: CheckerNow | None = None,
        planned: bool = True,
        memo: TranslationMemo | None = None,
    ) -> None:
        self._check = check
        # Answers a read that repeats an earlier check but for its request id (only with check_now).
        self._memo = memo if check_now is not None else None
        self._memo_key: tuple[object, ...] | None = None  # this read's, while it may be remembered
        self._memo_hash = 0  # and its hash
        self._memo_hit: tuple[Request, bool] | None = None  # the read's one check, once translated
        self._needles: tuple[bytes, ...] = ()  # b"\r\n<name>:" of the ignorable headers this peer sends
        self._needles_for: frozenset[str] = frozenset()  # the ignorable set they were learnt for
        self._learn = True  # learn them at the next full parse
        # Header fields decoded through a plan per sequence of names (False: one by one, the reference the
        # tests compare the plans with).
        self._planned = planned
        # Decides a check without waiting, or returns None when it would have to (Engine.check_now); then
        # ``check`` decides it. Without one, every check goes through ``check``.
        self._check_now = check_now
        self._registry = registry  # the server's open connections (HttpCheckServer.shutdown), if any
        self._stopping = False  # answer what was read with "connection: close", accept nothing more
        self._in_message = False
        self._in_body = False
        self._received = 0  # bytes of the current message so far (data_received)
        self._reads = 0  # reads so far (data_received), and the size of the last one
        self._read_size = 0
        self._begun_in = 0  # the read the current message began in
        self._settings = settings
        self._malformed = malformed
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer: tuple[str, int] = ("", 0)
        self._url = b""
        self._raw: list[bytes] = []  # this message's header fields as llhttp split them: name, value, ...
        self._body_bytes = 0
        self._error: MalformedRequest | None = None
        self._queue: deque[tuple[Request | MalformedRequest, bool]] = deque()
        self._draining = False
        self._closing = False

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        if self._registry is not None:
            self._registry.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = (str(peer[0]), int(peer[1]))

    def data_received(self, data: bytes) -> None:
        memo = self._memo
        if (
            memo is not None
            and not self._in_message  # the read starts a message: the parser waits between two
            and not self._queue
            and not self._draining
            and not self._stopping
            and not self._closing
            and len(data) <= MAX_HEADERS_BYTES
        ):
            if memo.ignorable_now() is not self._needles_for:
                self._needles, self._learn = (), True  # relearnt by the next full parse
            key = _memo_key(data, self._needles) if self._needles else None
            if key is None:
                self._learn = self._learn or bool(self._needles)  # a learnt header missing: learn again
            else:
                hashed = hash(key)
                entry = memo.entries.get(hashed)
                if (
                    entry is not None
                    and entry[0] == key
                    and (entry[3] is None or entry[3] == self._peer)
                    and self._answer_now(entry[1], entry[2], memo.check_again)
                ):
                    return
                if memo.seen_before(hashed):
                    self._memo_key = key
                    self._memo_hash = hashed
        self._feed(data)
        key = self._memo_key
        if key is not None:
            self._memo_key = None
            hit = self._memo_hit
            if hit is not None and memo is not None and not self._in_message:
                memo.store(key, self._memo_hash, hit[0], hit[1], self._peer)
            self._memo_hit = None

    def _feed(self, data: bytes) -> None:
        # httptools buffers a header value until its end, whatever its size: bound what one message may
        # make us hold (counted from its start; pipelined messages undercount by at most one read).
        received = self._received + len(data)
        if received > MAX_MESSAGE_BYTES:
            self._fail(_TOO_LARGE_BODY if self._in_body else _TOO_LARGE_HEAD)
            return
        self._received = received
        self._reads += 1
        self._read_size = len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        except httptools.HttpParserError:
            self._fail(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._transport = None
        if self._registry is not None:
            self._registry.discard(self)

    # -- stopping -------------------------------------------------------------------------------------
    def stop_gracefully(self) -> None:
        """HTTP/1.1 has no GOAWAY: close now if idle, else answer what was read with ``connection: close``
        (RFC 9112 §9.6) and close then."""
        self._stopping = True
        if not self._in_message and not self._draining and not self._queue:
            self._close_now()

    def _close_now(self) -> None:
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.close()

    def abort(self) -> None:
        """Close at once (the end of a shutdown's grace period)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, raw: bytes) -> None:
        if self._transport is not None and not self._closing:
            self._closing = True
            self._transport.write(raw)
            self._transport.close()

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self._in_message = True
        self._begun_in = self._reads
        self._in_body = False
        self._url = b""
        self._raw = []
        self._body_bytes = 0
        self._error = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_PATH_BYTES and self._error is None:
            self._error = MalformedRequest(f"path longer than {MAX_PATH_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        """Record the field as llhttp split it (one call per complete field, from C); decoding waits for
        the whole message (:func:`request_from_fields`). Past the count limit, stop storing: the message
        is refused once complete (what one message may hold is bounded in ``data_received``)."""
        raw = self._raw
        if len(raw) < _RAW_LIMIT:
            raw += (name, value)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES and self._error is None:
            self._error = MalformedRequest("check request body too large")

    def on_headers_complete(self) -> None:
        self._in_body = True

    def on_message_complete(self) -> None:
        self._in_message = False
        self._received = 0
        # A message that began in this read is no larger than it: then its fields need not be summed.
        size_bound = self._read_size if self._begun_in == self._reads else None
        keep_alive = self._parser.should_keep_alive() and not self._stopping
        item: Request | MalformedRequest
        if self._error is not None:
            item = self._error
        else:
            try:
                method = self._parser.get_method().decode("ascii")
                path = self._url.decode("utf-8")
                item = request_from_fields(
                    method,
                    path,
                    self._raw,
                    peer=self._peer,
                    settings=self._settings,
                    planned=self._planned,
                    size_bound=size_bound,
                )
            except UnicodeDecodeError:
                item = MalformedRequest("path is not valid UTF-8")
            except MalformedRequest as exc:
                item = exc
        if self._memo is not None:
            self._remember(item, keep_alive)
        if self._draining or self._queue or not self._answer_now(item, keep_alive):
            self._queue.append((item, keep_alive))
            if not self._draining:
                self._draining = True
                run_eagerly(self._drain())

    def _remember(self, item: Request | MalformedRequest, keep_alive: bool) -> None:
        """The memo's side of a full parse: learn which ignorable headers this peer sends (when asked to),
        and keep the check for the read's key when it is the read's only message, has no body and
        translated."""
        if self._memo_key is not None:
            if self._memo_hit is None and self._body_bytes == 0 and isinstance(item, Request):
                self._memo_hit = (item, keep_alive)
            else:  # a second message in the read, a body, or a malformed check: not remembered
                self._memo_key = None
                self._memo_hit = None
        if self._learn and isinstance(item, Request) and self._memo is not None:
            names = self._memo.ignorable_now()
            self._needles_for, self._learn = names, False
            self._needles = tuple(
                b"\r\n" + name + b":" for name in self._raw[0::2] if name.decode("latin-1").lower() in names
            )

    def _answer_now(
        self, item: Request | MalformedRequest, keep_alive: bool, check_now: CheckerNow | None = None
    ) -> bool:
        """Answer ``item`` from this callback when it can be decided without waiting (a malformed request,
        or ``check_now``, by default the connection's, decided it); False when it must wait its turn in the
        queue. Only called with nothing queued, so answers stay in request order (RFC 9112 §9.3.2)."""
        if check_now is None:
            check_now = self._check_now
        try:
            if isinstance(item, MalformedRequest):
                decision = self._malformed(item)
            elif check_now is None:
                return False
            else:
                decision_now = check_now(item)
                if decision_now is None:
                    return False
                decision = decision_now
            keep_alive = keep_alive and not self._stopping
            raw = encode_response(decision, keep_alive=keep_alive)
        except Exception:
            keep_alive = keep_alive and not self._stopping
            raw = _internal_error_response(keep_alive)
        self._send(raw, keep_alive)
        return True

    async def _drain(self) -> None:
        try:
            while self._queue:
                item, keep_alive = self._queue.popleft()
                try:
                    if isinstance(item, MalformedRequest):
                        decision = self._malformed(item)
                    else:
                        decision = await self._check(item)
                    keep_alive = keep_alive and not self._stopping  # a stop may come while deciding
                    raw = encode_response(decision, keep_alive=keep_alive)
                except Exception:
                    keep_alive = keep_alive and not self._stopping
                    raw = _internal_error_response(keep_alive)
                if not self._send(raw, keep_alive):
                    return
        finally:
            self._draining = False

    def _send(self, raw: bytes, keep_alive: bool) -> bool:
        """Write one answer; close after it unless ``keep_alive``. False when the connection is closing."""
        transport = self._transport
        if transport is None or self._closing:
            return False
        transport.write(raw)
        if not keep_alive:
            self._closing = True
            transport.close()
            return False
        return True


def _internal_error_response(keep_alive: bool) -> bytes:
    """The answer for a check whose deciding or encoding raised (called from the ``except`` block, so the
    log has the trace): a deny (fail closed), counted."""
    log.exception("internal error in HTTP check")
    INTERNAL_ERRORS.labels(front="http").inc()
    return encode_response(internal_error_decision("internal error"), keep_alive=keep_alive)


def run_eagerly(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` now, in this callback, until it first waits; only then hand it to a Task.

    A check whose token is cached never waits, so its response is written from ``data_received`` with no
    Task created and no extra loop iteration (``asyncio.eager_task_factory`` does this from Python 3.12).
    """
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return
    asyncio.get_running_loop().create_task(_resume(coro, waiting_on))


async def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Drive the rest of an eagerly started coroutine from a Task, as the Task would have."""
    while True:
        try:
            if waiting_on is None:  # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
            else:
                # The Future the coroutine is waiting for: take it over as Task.__step does (clear the
                # blocking flag the coroutine's own await set), then wait for it ourselves.
                waiting_on._asyncio_future_blocking = False
                await waiting_on
        except BaseException as exc:  # the wait failed or we were cancelled: the coroutine decides
            try:
                waiting_on = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return


HttpCheckServer = GracefulServer[HttpExtAuthzProtocol]
"""What :func:`serve_http` returns; its ``shutdown`` closes idle keep-alive connections and answers the
checks already read with ``connection: close``."""


async def serve_http(
    check: Checker,
    host: str,
    port: int,
    *,
    settings: HttpCheckSettings,
    malformed: Callable[[MalformedRequest], Decision],
    reuse_port: bool = False,
    sock: Any = None,
    check_now: CheckerNow | None = None,
    memo: TranslationMemo | None = None,
) -> HttpCheckServer:
    """Serve Envoy's HTTP ext_authz checks. ``check_now`` (e.g. ``Engine.check_now``), when given, answers
    the checks it can decide without waiting from the parser callback, with no coroutine per check; with
    a ``memo`` too, a check that repeats an earlier one but for its request id skips translation."""
    loop = asyncio.get_running_loop()
    connections: set[HttpExtAuthzProtocol] = set()

    def protocol() -> HttpExtAuthzProtocol:
        return HttpExtAuthzProtocol(check, settings, malformed, connections, check_now=check_now, memo=memo)

    if sock is not None:
        server = await loop.create_server(protocol, sock=sock, backlog=1024)
    else:
        server = await loop.create_server(protocol, host, port, reuse_port=reuse_port or None, backlog=1024)
    return HttpCheckServer(server, connections)

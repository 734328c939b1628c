"""Header decoding of the HTTP ext_authz front: the planned (bulk) path equals the field-by-field path.

The front records each field as llhttp split it and decodes a message at once, through a plan kept per
sequence of names (authz.server.http_ext_authz.request_from_fields). These tests feed the same byte
streams (arbitrary header sets, split at arbitrary boundaries, pipelined, behind a body) through a
connection that plans and one that decodes field by field, and compare every Request and every byte
answered; and compare both with a model of RFC 9110 field handling built from the generated fields.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from authz.decision import Decision, HeaderOps
from authz.errors import MalformedRequest
from authz.request import Request
from authz.server import http_ext_authz
from authz.server.http_ext_authz import (
    TRUSTED_HEADERS,
    HttpCheckSettings,
    HttpExtAuthzProtocol,
    request_from_fields,
)

PEER = ("10.9.8.7", 41000)
HOP = ("content-length", "connection", "keep-alive", "expect")
PLAIN = ("host", "authorization", "x-request-id", "user-agent", "x-a", "x-forwarded-for")
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = PEER) -> None:
        self.peer = peer
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


def one_by_one(*args: Any, **kwargs: Any) -> HttpExtAuthzProtocol:
    """The reference: every message decoded field by field."""
    return HttpExtAuthzProtocol(*args, **kwargs, planned=False)


def malformed(exc: MalformedRequest) -> Decision:
    return Decision(allowed=False, status=400, reason=exc.reason, message=exc.message, decision_id="m")


def run(
    cls: Callable[..., HttpExtAuthzProtocol], chunks: list[bytes], trust: bool = True
) -> tuple[list[Request], bytes]:
    seen: list[Request] = []

    async def check(request: Request) -> Decision:
        seen.append(request)
        if request.http is not None and request.http.path.startswith("/ok"):
            ops = HeaderOps(set=(("x-user", request.source.principal),), remove=("authorization",))
            return Decision(allowed=True, status=200, reason="allowed", headers=ops, decision_id="a")
        return Decision(allowed=False, status=403, reason="denied", decision_id="d")

    proto = cls(check, HttpCheckSettings(trust_envoy_headers=trust), malformed)
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        proto.data_received(chunk)
    return seen, b"".join(transport.out)


# -- generated messages ------------------------------------------------------------------------------------
def _cased(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda upper: "".join(c.upper() if u else c for c, u in zip(name, upper, strict=True))
    )


NAMES = st.one_of(
    st.sampled_from(PLAIN + TRUSTED_HEADERS),
    st.sampled_from(PLAIN + TRUSTED_HEADERS + ("connection", "keep-alive", "expect")).flatmap(_cased),
    st.text(TOKEN_CHARS, min_size=1, max_size=6),
)
# RFC 9110 §5.5 field-value bytes llhttp admits: VCHAR, SP, HTAB, obs-text (so also bytes that are not UTF-8).
VALUE_BYTES = st.sampled_from([0x09, 0x20, *range(0x21, 0x7F), 0x80, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF])
VALUES = st.one_of(
    st.sampled_from(
        [b"", b"+", b"+spiffe://td/ns/a/sa/b", b"+10.0.0.1:8080", b"+app=x,tier=y", b"plain", b"\xc3\xa9"]
    ),
    st.lists(VALUE_BYTES, max_size=12).map(bytes),
)
FIELDS = st.lists(st.tuples(NAMES, VALUES), max_size=10)


def message(path: str, fields: list[tuple[str, bytes]], body: bytes = b"") -> bytes:
    head = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in fields)
    if body:
        head += b"content-length: %d\r\n" % len(body)
    return b"GET " + path.encode() + b" HTTP/1.1\r\n" + head + b"\r\n" + body


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["/ok/1", "/no"]), FIELDS, st.sampled_from([b"", b"abc"])),
        min_size=1,
        max_size=3,
    ),
    st.lists(st.integers(min_value=0, max_value=4096), max_size=4),
    st.booleans(),
)
def test_planned_decoding_equals_field_by_field(
    messages: list[tuple[str, list[tuple[str, bytes]], bytes]], cuts: list[int], trust: bool
) -> None:
    """Same Requests, same answer bytes, whatever the fields, the reads and the pipelining."""
    stream = b"".join(message(path, fields, body) for path, fields, body in messages)
    chunks = split(stream, cuts)
    planned = run(HttpExtAuthzProtocol, chunks, trust)
    reference = run(one_by_one, chunks, trust)
    assert planned == reference
    assert [list(r.http.headers.items()) for r in planned[0] if r.http] == [
        list(r.http.headers.items()) for r in reference[0] if r.http
    ]
    # And a second pass, with every plan and fact already cached, answers the same again.
    assert run(HttpExtAuthzProtocol, chunks, trust) == reference


def expected_fields(fields: list[tuple[str, bytes]]) -> tuple[dict[str, str], dict[str, str]] | None:
    """RFC 9110 §5.3 model: lower-case names, leading OWS dropped (RFC 9112 §5), repeated names joined
    with ",", hop-by-hop fields out, the x-authz-* apart; None when a kept value is not UTF-8."""
    headers: dict[str, str] = {}
    trusted: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        if key in HOP or key == "transfer-encoding":
            continue
        try:
            text = value.lstrip(b" \t").decode("utf-8")
        except UnicodeDecodeError:
            return None
        target = trusted if key in TRUSTED_HEADERS else headers
        target[key] = text if key not in target else f"{target[key]},{text}"
    return headers, trusted


@settings(max_examples=150, deadline=None)
@given(FIELDS)
def test_decoded_fields_follow_the_rfc_model(fields: list[tuple[str, bytes]]) -> None:
    seen, out = run(HttpExtAuthzProtocol, [message("/ok/x", fields)], trust=False)
    model = expected_fields(fields)
    if model is None:
        assert seen == [] and out.startswith(b"HTTP/1.1 400 ") and b"not valid UTF-8" in out
        return
    headers, _ = model
    assert len(seen) == 1 and seen[0].http is not None
    got = dict(seen[0].http.headers)
    for pseudo in (":authority", ":method", ":path"):
        got.pop(pseudo)
    assert got == headers
    assert not set(got) & set(TRUSTED_HEADERS)


def test_envoy_check_is_decoded_through_one_plan() -> None:
    """Envoy's check shape (lower-case names, content-length: 0, the marked x-authz-* last) takes the plan
    path, and its facts come from the marked values."""
    fields = [
        ("host", b"svc:8080"),
        ("authorization", b"Bearer t"),
        ("x-request-id", b"r1"),
        ("content-length", b"0"),
        ("x-authz-source-principal", b"+spiffe://td/ns/a/sa/b"),
        ("x-authz-source-address", b"+10.1.2.3:4444"),
        ("x-authz-namespace", b"+prod"),
        ("x-authz-labels", b"+app=orders"),
    ]
    raw = [part for name, value in fields for part in (name.encode(), value)]
    http_ext_authz._plans.clear()
    request = request_from_fields("GET", "/p", raw, peer=PEER, settings=HttpCheckSettings())
    assert http_ext_authz._plans[tuple(raw[0::2])] is not None
    assert request.http is not None
    assert dict(request.http.headers) == {
        "host": "svc:8080",
        "authorization": "Bearer t",
        "x-request-id": "r1",
        ":authority": "svc:8080",
        ":method": "GET",
        ":path": "/p",
    }
    assert (request.source.address, request.source.port) == ("10.1.2.3", 4444)
    assert request.source.principal == "spiffe://td/ns/a/sa/b"
    assert dict(request.context_extensions) == {"namespace": "prod", "labels": "app=orders"}
    # A repeated name (in any case) cannot take a plan: it is joined field by field.
    again = [*raw, b"X-Request-Id", b"r2"]
    joined = request_from_fields("GET", "/p", again, peer=PEER, settings=HttpCheckSettings())
    assert http_ext_authz._plans[tuple(again[0::2])] is None
    assert joined.http is not None and joined.http.headers["x-request-id"] == "r1,r2"


def test_limits_are_the_same_on_both_paths() -> None:
    from authz.server.limits import MAX_HEADER_COUNT, MAX_HEADERS_BYTES

    many = (
        b"GET /ok HTTP/1.1\r\n" + b"".join(b"x-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 1)) + b"\r\n"
    )
    at_limit = (
        b"GET /ok HTTP/1.1\r\n" + b"".join(b"x-%d: v\r\n" % i for i in range(MAX_HEADER_COUNT)) + b"\r\n"
    )
    big = b"GET /ok HTTP/1.1\r\nx-big: " + b"v" * (MAX_HEADERS_BYTES - 4) + b"\r\n\r\n"  # one byte over
    fits = (
        b"GET /ok HTTP/1.1\r\nx-big: " + b"v" * (MAX_HEADERS_BYTES - 5) + b"\r\n\r\n"
    )  # name + value: the limit
    for raw, refused in ((many, True), (at_limit, False), (big, True), (fits, False)):
        for cls in (HttpExtAuthzProtocol, one_by_one):
            seen, out = run(cls, [raw])
            assert out.startswith(b"HTTP/1.1 400 ") == refused, (cls, raw[:40])
            assert (b"too large" in out) == refused
            assert len(seen) == (0 if refused else 1)


def test_unmarked_source_address_does_not_share_facts_across_peers() -> None:
    """The connection facts are cached by the headers; without Envoy's marked source address the source is
    the connection's own peer, so two peers sending the same headers must not share one source."""
    http_ext_authz._facts_cache.clear()
    trusted = {"x-authz-source-address": "10.0.0.1:1", "x-authz-namespace": "+ns"}
    settings_ = HttpCheckSettings()
    first = http_ext_authz.build_request(
        "GET", "/", {}, peer=("192.0.2.1", 1111), settings=settings_, trusted=dict(trusted)
    )
    second = http_ext_authz.build_request(
        "GET", "/", {}, peer=("192.0.2.2", 2222), settings=settings_, trusted=dict(trusted)
    )
    assert (first.source.address, first.source.port) == ("192.0.2.1", 1111)
    assert (second.source.address, second.source.port) == ("192.0.2.2", 2222)
    marked = {"x-authz-source-address": "+10.0.0.1:1"}
    third = http_ext_authz.build_request(
        "GET", "/", {}, peer=("192.0.2.3", 3333), settings=settings_, trusted=dict(marked)
    )
    assert (third.source.address, third.source.port) == ("10.0.0.1", 1)


def test_allow_head_is_rebuilt_for_each_header_ops_value() -> None:
    from authz.server.http_ext_authz import encode_response

    one = Decision(
        allowed=True, status=200, reason="a", decision_id="i1", headers=HeaderOps(set=(("x-u", "1"),))
    )
    two = Decision(
        allowed=True, status=200, reason="a", decision_id="i2", headers=HeaderOps(set=(("x-u", "2"),))
    )
    assert encode_response(one, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-u: 1\r\nx-authz-decision-id: i1\r\n\r\n"
    )
    assert encode_response(two, keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n"
        b"x-u: 2\r\nx-authz-decision-id: i2\r\n\r\n"
    )
    assert encode_response(one, keep_alive=False).count(b"connection: close") == 1


def test_header_size_limit_holds_across_reads_and_pipelining() -> None:
    """The fields' size is summed unless the whole message arrived in one read no larger than the limit:
    a message that began in an earlier read (behind a pipelined one) is summed whatever the last read's
    size, so a small final read never waves an oversize message through."""
    from authz.server.limits import MAX_HEADERS_BYTES

    first = b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n"
    big = b"GET /ok HTTP/1.1\r\nx-big: " + b"v" * (MAX_HEADERS_BYTES - 4) + b"\r\n\r\n"  # one byte over
    fits = b"GET /ok HTTP/1.1\r\nx-big: " + b"v" * (MAX_HEADERS_BYTES - 5) + b"\r\n\r\n"
    for second, refused in ((big, True), (fits, False)):
        stream = first + second
        for cut in (len(first), len(first) + 10, len(stream) - 100, len(stream) - 2, len(stream) - 1):
            for cls in (HttpExtAuthzProtocol, one_by_one):
                seen, out = run(cls, [stream[:cut], stream[cut:]])
                answers = out.split(b"HTTP/1.1 ")[1:]
                assert len(answers) == 2, (cut, cls)
                assert answers[0].startswith(b"200 ")
                assert answers[1].startswith(b"400 ") == refused, (cut, cls)
                assert len(seen) == (1 if refused else 2)

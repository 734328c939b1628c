"""The HTTP/1.1 codec: strict framing decisions, limits, hop-by-hop stripping; fuzzed with hypothesis."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.proxy import http1
from authz.proxy.http1 import (
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    encode_chunk,
    serialize_request_head,
    strip_hop_by_hop,
)


def parse(data: bytes, **kw: int) -> list[object]:
    p = RequestParser(**kw)
    p.feed(data)
    return list(p.events)


def test_simple_request_head_and_end() -> None:
    events = parse(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    head = events[0].head  # type: ignore[attr-defined]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version, head.body) == ("GET", "/a?b=1", "1.1", "none")
    assert head.get("x-a") == "1,2"
    assert [e.kind for e in events] == ["head", "end"]  # type: ignore[attr-defined]


def test_chunked_body_is_decoded() -> None:
    events = parse(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    kinds = [e.kind for e in events]  # type: ignore[attr-defined]
    assert kinds[0] == "head" and kinds[-1] == "end"
    assert b"".join(e.data for e in events if e.kind == "body") == b"abc"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 417),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
    ],
)
def test_rejections_carry_their_status(data: bytes, status: int) -> None:
    events = parse(data)
    assert events[-1].kind == "error"  # type: ignore[attr-defined]
    assert events[-1].error.status == status  # type: ignore[attr-defined]
    assert not any(e.kind == "head" for e in events)  # type: ignore[attr-defined]


def test_header_count_and_size_limits_give_431() -> None:
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(10)) + b"\r\n"
    assert parse(many, max_header_count=5)[-1].error.status == 431  # type: ignore[attr-defined]
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 5000 + b"\r\n\r\n"
    assert parse(big, max_header_bytes=1024)[-1].error.status == 431  # type: ignore[attr-defined]


def test_incomplete_huge_header_is_cut_before_it_completes() -> None:
    p = RequestParser(max_header_bytes=1024)
    for _ in range(10):
        p.feed(b"GET / HTTP/1.1\r\nX: " + b"v" * 4096 if not p.events else b"v" * 4096)
    assert p.failed
    assert p.events[-1].error.status == 431  # type: ignore[union-attr]


def test_response_parser_1xx_204_and_framing() -> None:
    p = ResponseParser()
    p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\nrest")
    heads = [e.head for e in p.events if e.kind == "head"]
    assert [h.status for h in heads if isinstance(h, ResponseHead)] == [100, 204, 200]
    assert heads[-1].body == "close"  # type: ignore[union-attr]


def test_strip_hop_by_hop_removes_connection_named_fields() -> None:
    headers = [
        ("connection", "close, x-a"),
        ("x-a", "1"),
        ("keep-alive", "t"),
        ("te", "trailers"),
        ("x-b", "2"),
        ("content-length", "3"),
        ("proxy-authorization", "p"),
        ("transfer-encoding", "chunked"),
    ]
    assert strip_hop_by_hop(headers) == [("x-b", "2")]


header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=20).filter(
    lambda n: n not in ("host", "content-length", "transfer-encoding", "expect", "upgrade", "connection")
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


@settings(max_examples=60, deadline=None)
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=20), body=st.binary(max_size=200))
def test_serialized_request_parses_back(headers: list[tuple[str, str]], body: bytes) -> None:
    wire = serialize_request_head("POST", "/x", [("host", "h"), *headers, ("transfer-encoding", "chunked")])
    wire += (encode_chunk(body) if body else b"") + b"0\r\n\r\n"
    events = parse(wire)
    head = events[0].head  # type: ignore[attr-defined]
    assert isinstance(head, RequestHead)
    assert head.headers[1:-1] == headers
    assert b"".join(e.data for e in events if e.kind == "body") == body  # type: ignore[attr-defined]
    assert events[-1].kind == "end"  # type: ignore[attr-defined]


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=512), split=st.integers(min_value=0, max_value=512))
def test_parser_never_raises_on_arbitrary_bytes(data: bytes, split: int) -> None:
    p = RequestParser(max_header_bytes=256, max_header_count=8)
    p.feed(data[:split])
    p.feed(data[split:])
    for e in p.events:
        assert e.kind in ("head", "body", "end", "error")
        if e.kind == "head":
            head = e.head
            assert isinstance(head, RequestHead)
            assert head.get("host") is not None or head.version == "1.0"
            assert not (head.get("content-length") and head.get("transfer-encoding"))


def test_httptools_is_strict_by_default() -> None:
    class Sink:
        pass

    with pytest.raises(httptools.HttpParserError):
        httptools.HttpRequestParser(Sink()).feed_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n b\r\n\r\n")


def test_field_names_are_lower_cased_past_the_name_cache_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are decoded once and kept (bounded): past the bound they are still lower-cased, not kept."""
    monkeypatch.setattr(http1, "_field_names", {})
    monkeypatch.setattr(http1, "MAX_CACHED_FIELD_NAMES", 3)
    names = [f"X-Name-{i}" for i in range(6)]
    raw = "".join(f"{n}: v{i}\r\n" for i, n in enumerate(names))
    for _ in range(2):  # the second message reads the cached names
        head = parse(f"GET / HTTP/1.1\r\nHost: h\r\n{raw}\r\n".encode())[0].head  # type: ignore[attr-defined]
        assert head.headers == [("host", "h"), *[(n.lower(), f"v{i}") for i, n in enumerate(names)]]
    assert len(http1._field_names) == 3

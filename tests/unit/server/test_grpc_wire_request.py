"""``request_from_check`` (memoized peers and extensions, fewer upb reads) against the translation it
replaced, kept here verbatim as the oracle: same Request, or the same MalformedRequest message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.errors import MalformedRequest
from authz.request import EMPTY_MAP, HttpAttributes, Peer, Request
from authz.server import grpc_ext_authz
from authz.server.grpc_ext_authz import request_from_check
from authz.server.limits import MAX_HEADER_COUNT, MAX_HEADERS_BYTES, MAX_PATH_BYTES

# -- The oracle: request_from_check as it was before it was made cheaper ---------------------------------


def _reference_peer(pb: Any) -> Peer:
    sa = pb.address.socket_address
    cert = pb.certificate
    return Peer(
        address=sa.address,
        port=sa.port_value,
        principal=pb.principal,
        certificate=unquote(cert) if cert else "",
    )


def _reference_headers(http: Any) -> Mapping[str, str]:
    if http.headers:
        headers: Mapping[str, str] = http.headers
        if len(headers) > MAX_HEADER_COUNT:
            raise MalformedRequest(f"{len(headers)} headers, more than {MAX_HEADER_COUNT}")
        size = http.ByteSize() - len(http.body) - len(http.raw_body) - len(http.path)
        if size > MAX_HEADERS_BYTES + 4 * len(headers):
            raise MalformedRequest(f"headers of about {size} bytes, more than {MAX_HEADERS_BYTES}")
        return dict(headers)
    entries = http.header_map.headers
    if not entries:
        return EMPTY_MAP
    if len(entries) > MAX_HEADER_COUNT:
        raise MalformedRequest(f"{len(entries)} headers, more than {MAX_HEADER_COUNT}")
    out: dict[str, str] = {}
    size = 0
    for e in entries:
        if e.raw_value:
            try:
                value = e.raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedRequest(f"header {e.key!r} is not valid UTF-8") from None
        else:
            value = e.value
        key = e.key.lower()
        size += len(key) + len(value)
        out[key] = f"{out[key]},{value}" if key in out else value
    if size > MAX_HEADERS_BYTES:
        raise MalformedRequest(f"headers of {size} bytes, more than {MAX_HEADERS_BYTES}")
    return out


def reference_request_from_check(check: external_auth_pb2.CheckRequest) -> Request:
    attrs = check.attributes
    http_pb = attrs.request.http if attrs.request.HasField("http") else None
    http: HttpAttributes | None = None
    if http_pb is not None:
        path = http_pb.path
        if len(path) > MAX_PATH_BYTES:
            raise MalformedRequest(f":path of {len(path)} bytes, more than {MAX_PATH_BYTES}")
        headers = _reference_headers(http_pb)
        method = http_pb.method or headers.get(":method", "")
        if not method:
            raise MalformedRequest("HTTP request without a method")
        http = HttpAttributes(
            method=method,
            host=http_pb.host or headers.get(":authority", ""),
            path=path or headers.get(":path", ""),
            scheme=http_pb.scheme,
            protocol=http_pb.protocol,
            headers=headers,
            id=http_pb.id,
            body=http_pb.raw_body or http_pb.body.encode("utf-8", "surrogateescape"),
        )
    metadata: Mapping[str, Any] = EMPTY_MAP
    if attrs.HasField("metadata_context") and attrs.metadata_context.filter_metadata:
        metadata = {
            k: json_format.MessageToDict(v) for k, v in attrs.metadata_context.filter_metadata.items()
        }
    return Request(
        source=_reference_peer(attrs.source),
        destination=_reference_peer(attrs.destination),
        http=http,
        sni=attrs.tls_session.sni if attrs.HasField("tls_session") else "",
        context_extensions=dict(attrs.context_extensions) if attrs.context_extensions else EMPTY_MAP,
        metadata=metadata,
    )


# -- Generated CheckRequests -------------------------------------------------------------------------------

_short = st.text(max_size=8)
# A few fixed values so equal peers and extensions repeat across examples (the memoized paths).
_addresses = st.one_of(st.sampled_from(["", "10.0.0.1", "127.0.0.1", "::1"]), _short)
_principals = st.one_of(st.sampled_from(["", "spiffe://cluster.local/ns/a/sa/b"]), _short)
_certificates = st.one_of(
    st.just(""),
    st.just("-----BEGIN%20CERTIFICATE-----%0AMIIB%2B%0A-----END%20CERTIFICATE-----%0A"),
    st.text(alphabet="%0A2Bx ", max_size=12),
)
_big = st.builds(
    lambda unit, times: unit * times, st.sampled_from(["a", "é"]), st.sampled_from([9000, 17000])
)


@st.composite
def check_requests(draw: st.DrawFn) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    for peer in (a.source, a.destination):
        if draw(st.booleans()):
            peer.address.socket_address.address = draw(_addresses)
            peer.address.socket_address.port_value = draw(st.sampled_from([0, 80, 51234, 65535]))
            peer.principal = draw(_principals)
            peer.certificate = draw(_certificates)
            if draw(st.booleans()):
                peer.labels["app"] = draw(_short)
    http_mode = draw(st.sampled_from(["absent", "empty", "fields"]))
    if http_mode == "empty":
        a.request.http.SetInParent()
    elif http_mode == "fields":
        h = a.request.http
        h.method = draw(st.sampled_from(["", "GET", "POST"]))
        h.path = draw(st.one_of(st.sampled_from(["", "/", "/a?b=c"]), _short, _big))
        h.host = draw(st.one_of(st.just(""), _short))
        h.scheme = draw(st.sampled_from(["", "http", "https"]))
        h.protocol = draw(st.sampled_from(["", "HTTP/1.1", "HTTP/2"]))
        h.id = draw(st.one_of(st.just(""), _short))
        if draw(st.booleans()):
            h.body = draw(st.one_of(_short, _big))
        if draw(st.booleans()):
            h.raw_body = draw(st.binary(max_size=8))
        header_mode = draw(st.sampled_from(["map", "map", "header_map", "none", "many"]))
        if header_mode == "map":
            names = st.one_of(st.sampled_from([":method", ":authority", ":path", "authorization"]), _short)
            for k, v in draw(st.dictionaries(names, st.one_of(_short, _big), max_size=5)).items():
                h.headers[k] = v
        elif header_mode == "header_map":
            for k, value, raw in draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(["X-A", "x-a", ":method", ":Path", "b"]),
                        _short,
                        st.one_of(st.just(b""), st.binary(max_size=4), st.just(b"\xff\xfe")),
                    ),
                    max_size=4,
                )
            ):
                h.header_map.headers.append(base_pb2.HeaderValue(key=k, value=value, raw_value=raw))
        elif header_mode == "many":
            for i in range(draw(st.sampled_from([MAX_HEADER_COUNT, MAX_HEADER_COUNT + 1]))):
                h.headers[f"x-{i}"] = "v"
    if draw(st.booleans()):
        a.tls_session.sni = draw(st.one_of(st.just(""), _short))
    for k, v in draw(st.dictionaries(st.sampled_from(["namespace", "labels"]), _short, max_size=2)).items():
        a.context_extensions[k] = v
    if draw(st.booleans()):
        a.metadata_context.SetInParent()
        if draw(st.booleans()):
            a.metadata_context.filter_metadata["envoy.filters.x"].update({"k": draw(_short)})
    return req


def _translate(translate: Any, req: external_auth_pb2.CheckRequest) -> Request | str:
    try:
        result: Request = translate(req)
    except MalformedRequest as exc:
        return f"malformed: {exc.message}"
    return result


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(check_requests())
def test_translation_equals_the_reference(req: external_auth_pb2.CheckRequest) -> None:
    expected = _translate(reference_request_from_check, req)
    assert _translate(request_from_check, req) == expected
    # Again through the memoized peers and extensions; and from the bytes Envoy would send.
    assert _translate(request_from_check, req) == expected
    wire = external_auth_pb2.CheckRequest.FromString(req.SerializeToString())
    assert _translate(request_from_check, wire) == expected


def test_an_empty_but_present_http_is_an_http_check_and_an_absent_one_tcp() -> None:
    req = external_auth_pb2.CheckRequest()
    assert request_from_check(req).http is None
    req.attributes.request.http.SetInParent()
    assert _translate(request_from_check, req) == "malformed: HTTP request without a method"


def test_peers_are_shared_and_their_cache_bounded() -> None:
    req = external_auth_pb2.CheckRequest()
    dst = req.attributes.destination
    dst.address.socket_address.address, dst.principal = "10.0.0.2", "spiffe://td/ns/a/sa/b"
    first, second = request_from_check(req), request_from_check(req)
    assert first.destination is second.destination
    for port in range(grpc_ext_authz.MAX_CACHED_PEERS + 5):
        req.attributes.source.address.socket_address.port_value = port
        assert request_from_check(req).source.port == port
    assert len(grpc_ext_authz._peers) <= grpc_ext_authz.MAX_CACHED_PEERS


def test_a_peer_too_large_to_hold_is_translated_but_not_cached() -> None:
    req = external_auth_pb2.CheckRequest()
    req.attributes.source.certificate = "%41" * grpc_ext_authz.MAX_CACHED_PEER_BYTES
    key = req.attributes.source.SerializeToString()
    assert request_from_check(req).source.certificate == "A" * grpc_ext_authz.MAX_CACHED_PEER_BYTES
    assert key not in grpc_ext_authz._peers


def _http_check(**fields: Any) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    h = req.attributes.request.http
    for name, value in fields.items():
        if name == "headers":
            for k, v in value.items():
                h.headers[k] = v
        else:
            setattr(h, name, value)
    return req


def test_method_host_and_path_fall_back_to_pseudo_headers() -> None:
    req = _http_check(headers={":method": "PUT", ":authority": "orders", ":path": "/p"})
    expected = reference_request_from_check(req)
    assert request_from_check(req) == expected
    assert expected.http is not None
    assert (expected.http.method, expected.http.host, expected.http.path) == ("PUT", "orders", "/p")


def test_header_size_bound_leaves_out_the_body_and_path() -> None:
    """Headers just under the bound with a large body and path: accepted, as by the reference."""
    headers = {"x-big": "a" * (MAX_HEADERS_BYTES - 64)}
    req = _http_check(method="GET", path="/" * MAX_PATH_BYTES, body="b" * 50_000, headers=headers)
    assert request_from_check(req) == reference_request_from_check(req)
    over = _http_check(method="GET", headers={"x-big": "a" * (MAX_HEADERS_BYTES + 2048)})
    assert _translate(request_from_check, over) == _translate(reference_request_from_check, over)
    assert str(_translate(request_from_check, over)).startswith("malformed: headers of about")

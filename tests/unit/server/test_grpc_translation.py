"""CheckRequest -> Request and Decision -> CheckResponse, the only translation the gRPC front does."""

from __future__ import annotations

import contextlib
import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.decision import Decision, HeaderOps, ShadowResult
from authz.errors import MalformedRequest
from authz.server.grpc_ext_authz import request_from_check, response_from_decision
from authz.server.limits import MAX_HEADER_COUNT, MAX_HEADERS_BYTES


def check_request(**http: object) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "10.0.0.1"
    a.source.address.socket_address.port_value = 5555
    a.source.principal = "spiffe://cluster.local/ns/foo/sa/bar"
    a.source.certificate = "-----BEGIN%20CERTIFICATE-----%0AMIIB%2B%0A-----END%20CERTIFICATE-----%0A"
    a.destination.address.socket_address.address = "10.0.0.2"
    a.destination.address.socket_address.port_value = 8080
    a.destination.principal = "spiffe://cluster.local/ns/orders/sa/orders"
    a.context_extensions["namespace"] = "orders"
    a.tls_session.sni = "outbound_.8080_._.orders.svc.cluster.local"
    h = a.request.http
    h.method = str(http.get("method", "GET"))
    h.path = str(http.get("path", "/a?b=c"))
    h.host = str(http.get("host", "orders:8080"))
    h.protocol = "HTTP/1.1"
    h.id = "123"
    for k, v in dict(http.get("headers", {":method": "GET", "authorization": "Bearer t"})).items():  # type: ignore[call-overload]
        h.headers[k] = v
    return req


def test_translates_every_attribute() -> None:
    r = request_from_check(check_request())
    assert r.source.address == "10.0.0.1" and r.source.port == 5555
    assert r.source.principal == "spiffe://cluster.local/ns/foo/sa/bar"
    assert r.source.certificate == "-----BEGIN CERTIFICATE-----\nMIIB+\n-----END CERTIFICATE-----\n"
    assert r.destination.port == 8080
    assert r.destination.principal.endswith("/sa/orders")
    assert r.context_extensions == {"namespace": "orders"}
    assert r.sni == "outbound_.8080_._.orders.svc.cluster.local"
    assert r.http is not None
    assert (r.http.method, r.http.path, r.http.host, r.http.id) == ("GET", "/a?b=c", "orders:8080", "123")
    assert r.http.headers["authorization"] == "Bearer t"


def test_tcp_check_has_no_http_attributes() -> None:
    req = external_auth_pb2.CheckRequest()
    req.attributes.source.address.socket_address.address = "10.0.0.1"
    r = request_from_check(req)
    assert r.http is None
    assert r.source.address == "10.0.0.1"


def test_raw_header_map_is_decoded_and_duplicates_joined() -> None:
    req = check_request(headers={})
    for k, v in ((b"x-a", b"1"), (b"X-A", b"2"), (b"x-b", b"caf\xc3\xa9")):
        req.attributes.request.http.header_map.headers.append(
            base_pb2.HeaderValue(key=k.decode(), raw_value=v)
        )
    r = request_from_check(req)
    assert r.http is not None
    assert r.http.headers == {"x-a": "1,2", "x-b": "café"}


def test_non_utf8_raw_header_is_malformed() -> None:
    req = check_request(headers={})
    req.attributes.request.http.header_map.headers.append(
        base_pb2.HeaderValue(key="x", raw_value=b"\xff\xfe")
    )
    with pytest.raises(MalformedRequest):
        request_from_check(req)


def test_gigantic_and_too_many_headers_are_malformed() -> None:
    with pytest.raises(MalformedRequest):
        request_from_check(check_request(headers={"x-big": "a" * (MAX_HEADERS_BYTES + 1)}))
    with pytest.raises(MalformedRequest):
        request_from_check(check_request(headers={f"x-{i}": "v" for i in range(MAX_HEADER_COUNT + 1)}))


def test_missing_method_is_malformed() -> None:
    with pytest.raises(MalformedRequest):
        request_from_check(check_request(method="", headers={}))


def test_allow_response_carries_header_ops_and_identity_metadata() -> None:
    d = Decision(
        allowed=True,
        status=200,
        reason="allowed_by_policy",
        decision_id="abc-1",
        principal="spiffe://cluster.local/ns/foo/sa/bar",
        request_principal="https://idp/alice",
        claims={"sub": "alice", "aud": ["orders"], "nested": {"x": 1}},
        headers=HeaderOps(
            set=(("x-user", "alice"),),
            append=(("x-tag", "1"),),
            remove=("authorization",),
            response=(("x-r", "2"),),
        ),
        shadow=ShadowResult(allowed=False, policy_id="ns[foo]-policy[dry]-rule[0]"),
    )
    resp = response_from_decision(d)
    assert resp.status.code == 0
    ok = resp.ok_response
    assert [(h.header.key, h.header.value, h.append_action) for h in ok.headers] == [
        ("x-user", "alice", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
        ("x-tag", "1", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
    ]
    assert list(ok.headers_to_remove) == ["authorization"]
    assert ok.response_headers_to_add[0].header.key == "x-r"
    md = resp.dynamic_metadata
    assert md["principal"] == "spiffe://cluster.local/ns/foo/sa/bar"
    assert md["request_principal"] == "https://idp/alice"
    assert md["claims"]["sub"] == "alice"
    assert "nested" not in md["claims"]
    assert md["shadow_engine_result"] == "denied"


@pytest.mark.parametrize(("status", "grpc_code"), [(401, 16), (403, 7), (400, 3)])
def test_deny_response_status_body_and_headers(status: int, grpc_code: int) -> None:
    d = Decision(
        allowed=False,
        status=status,
        reason="x_reason",
        policy_id="ns[a]-policy[b]-rule[0]",
        decision_id="id-9",
        www_authenticate='Bearer error="invalid_token"' if status == 401 else "",
    )
    resp = response_from_decision(d)
    assert resp.status.code == grpc_code
    assert resp.denied_response.status.code == status
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    assert headers["x-authz-decision-id"] == "id-9"
    assert ("www-authenticate" in headers) == (status == 401)
    body = json.loads(resp.denied_response.body)
    assert body["reason"] == "x_reason" and body["policy"] == "ns[a]-policy[b]-rule[0]"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_escape_as_anything_but_malformed(data: bytes) -> None:
    """Whatever a peer sends that parses as a CheckRequest translates or is malformed; nothing else."""
    req = external_auth_pb2.CheckRequest()
    try:
        req.ParseFromString(data)
    except Exception:  # not a CheckRequest at all: gRPC would have rejected it before us
        return
    with contextlib.suppress(MalformedRequest):
        request_from_check(req)

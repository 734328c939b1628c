"""The gRPC front's replies as wire bytes: ``response_bytes`` parses equal to ``response_from_decision``.

``response_bytes`` caches the encoding of everything the decision id does not shape and appends the id
as hand-encoded tails (protobuf merges a concatenation); these tests prove the bytes parse to the very
message ``response_from_decision`` builds, for allows and denies, long and unicode values included, and
that the servicer registered by ``add_to_server`` sends those bytes unchanged over gRPC.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.decision import Decision, HeaderOps, Reason, ShadowResult
from authz.errors import MalformedRequest
from authz.request import Request
from authz.server import grpc_ext_authz
from authz.server.grpc_ext_authz import (
    AuthorizationServicer,
    add_to_server,
    response_bytes,
    response_from_decision,
)

CheckResponse = external_auth_pb2.CheckResponse

# Short, unicode and long text: lengths that make every length prefix above them one, two and three
# varint bytes (> 127 and > 16383 encoded bytes), built by repetition so generating them stays cheap.
_short = st.text(max_size=12)
_long = st.builds(
    lambda unit, times: unit * times,
    st.text(min_size=1, max_size=3),
    st.sampled_from([43, 60, 130, 5500, 6000]),
)
texts = st.one_of(_short, _short, _long)
header_pairs = st.lists(st.tuples(texts, texts), max_size=3).map(tuple)
header_ops = st.builds(
    HeaderOps,
    set=header_pairs,
    append=header_pairs,
    remove=st.lists(texts, max_size=3).map(tuple),
    response=header_pairs,
)
claim_values = st.one_of(
    texts,
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.one_of(_short, st.integers(-1000, 1000), st.booleans()), max_size=3),
    st.dictionaries(_short, _short, max_size=2),  # not a claim type the reply carries: dropped
)
claims = st.one_of(
    st.just(MappingProxyType({})),
    st.dictionaries(_short, claim_values, max_size=4).map(MappingProxyType),
)
decisions = st.builds(
    Decision,
    allowed=st.booleans(),
    status=st.sampled_from([200, 400, 401, 403]),
    reason=texts,
    message=texts,
    policy_id=texts,
    headers=header_ops,
    www_authenticate=st.one_of(st.just(""), texts),
    principal=texts,
    request_principal=texts,
    claims=claims,
    audit=st.booleans(),
    shadow=st.one_of(st.none(), st.builds(ShadowResult, allowed=st.booleans(), policy_id=texts)),
    decision_id=texts,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decisions)
def test_bytes_parse_equal_to_the_built_message(decision: Decision) -> None:
    expected = response_from_decision(decision)
    first = response_bytes(decision)  # builds (or finds) the cached prefix
    assert CheckResponse.FromString(first) == expected
    assert response_bytes(decision) == first  # the cached prefix gives the same bytes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decisions, texts, texts)
def test_decisions_differing_only_in_id_share_the_prefix(decision: Decision, id_a: str, id_b: str) -> None:
    a = Decision(**{**_fields(decision), "decision_id": id_a})
    b = Decision(**{**_fields(decision), "decision_id": id_b})
    bytes_a, bytes_b = response_bytes(a), response_bytes(b)
    assert CheckResponse.FromString(bytes_a) == response_from_decision(a)
    assert CheckResponse.FromString(bytes_b) == response_from_decision(b)
    assert CheckResponse.FromString(bytes_a).dynamic_metadata["decision_id"] == id_a
    assert CheckResponse.FromString(bytes_b).dynamic_metadata["decision_id"] == id_b


def _fields(decision: Decision) -> dict[str, Any]:
    return {name: getattr(decision, name) for name in Decision.__dataclass_fields__}


def _allow(decision_id: str, **changes: Any) -> Decision:
    base: dict[str, Any] = {
        "allowed": True,
        "status": 200,
        "reason": "allowed_by_policy",
        "policy_id": "ns[a]-policy[b]-rule[0]",
        "request_principal": "https://idp/alice",
        "claims": MappingProxyType({"sub": "alice", "aud": ["orders"]}),
        "headers": HeaderOps(set=(("x-user", "alice"),), remove=("authorization",)),
        "decision_id": decision_id,
    }
    return Decision(**{**base, **changes})


def _common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:  # bounded by the shorter reply
        n += 1
    return n


def test_two_allows_with_different_ids_share_the_prefix_and_parse_to_their_own_ids() -> None:
    claims = MappingProxyType({"sub": "alice", "aud": ["orders"]})
    one = response_bytes(_allow("id-1", claims=claims))
    two = response_bytes(_allow("id-22222", claims=claims))
    # Everything but the id tail is shared: the first reply minus its tail is the second's beginning.
    tail = grpc_ext_authz._decision_id_tail(b"id-1")
    assert one.endswith(tail)
    assert two.startswith(one[: -len(tail)])
    assert _common_prefix(one, two) >= len(one) - len(tail)
    assert CheckResponse.FromString(one).dynamic_metadata["decision_id"] == "id-1"
    assert CheckResponse.FromString(two).dynamic_metadata["decision_id"] == "id-22222"
    assert CheckResponse.FromString(two).dynamic_metadata["claims"]["sub"] == "alice"


def test_two_denies_with_different_ids_carry_their_own_id_in_header_body_and_metadata() -> None:
    deny = Decision(
        allowed=False,
        status=401,
        reason=Reason.INVALID_TOKEN,
        www_authenticate='Bearer error="invalid_token"',
        decision_id="d-1",
    )
    for decision_id in ("d-1", "d-é" * 100, ""):
        decision = Decision(**{**_fields(deny), "decision_id": decision_id})
        parsed = CheckResponse.FromString(response_bytes(decision))
        assert parsed == response_from_decision(decision)
        headers = [(h.header.key, h.header.value) for h in parsed.denied_response.headers]
        assert headers == [
            ("content-type", "application/json"),
            ("x-authz-decision-id", decision_id),
            ("www-authenticate", 'Bearer error="invalid_token"'),
        ]
        assert json.loads(parsed.denied_response.body)["decision_id"] == decision_id
        assert parsed.dynamic_metadata["decision_id"] == decision_id


def test_an_equal_looking_but_different_claims_mapping_never_reuses_a_cached_reply() -> None:
    alice = _allow("x", claims=MappingProxyType({"sub": "alice"}))
    bob = _allow("x", claims=MappingProxyType({"sub": "bob"}))
    assert CheckResponse.FromString(response_bytes(alice)).dynamic_metadata["claims"]["sub"] == "alice"
    assert CheckResponse.FromString(response_bytes(bob)).dynamic_metadata["claims"]["sub"] == "bob"
    # Equal header operations in a different object are the same shape: the same cached bytes serve both.
    again = _allow("x", claims=alice.claims, headers=HeaderOps(**_fields_ops(alice.headers)))
    assert response_bytes(again) == response_bytes(alice)


def _fields_ops(ops: HeaderOps) -> dict[str, Any]:
    return {name: getattr(ops, name) for name in HeaderOps.__dataclass_fields__}


def test_reply_cache_is_bounded() -> None:
    for i in range(grpc_ext_authz.MAX_CACHED_RESPONSES + 10):
        response_bytes(_allow("id", policy_id=f"p{i}"))
    assert 0 < len(grpc_ext_authz._replies) <= grpc_ext_authz.MAX_CACHED_RESPONSES


@pytest.mark.parametrize("length", [0, 1, 100, 101, 108, 109, 127, 128, 16383, 16384, 70000])
def test_decision_id_tail_at_varint_boundaries(length: int) -> None:
    decision_id = "i" * length
    parsed = CheckResponse.FromString(grpc_ext_authz._decision_id_tail(decision_id.encode()))
    assert list(parsed.dynamic_metadata.fields) == ["decision_id"]
    assert parsed.dynamic_metadata["decision_id"] == decision_id


# -- The servicer -----------------------------------------------------------------------------------------


def _check_request(path: str = "/allow", method: str = "GET") -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = method, path, "orders"
    http.headers[":method"] = method
    return req


class _Checker:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Request) -> Decision:
        self.calls += 1
        assert request.http is not None
        if request.http.path == "/boom":
            raise RuntimeError("bug")
        if request.http.path == "/unencodable":  # a lone surrogate cannot be UTF-8: encoding fails
            return _allow("\ud800")
        if request.http.path.startswith("/allow"):
            return _allow(f"id-{self.calls}")
        return Decision(
            allowed=False, status=403, reason=Reason.NO_ALLOW_MATCH, decision_id=f"id-{self.calls}"
        )


def _malformed(exc: MalformedRequest) -> Decision:
    return Decision(allowed=False, status=400, reason=exc.reason, message=exc.message, decision_id="m-1")


def _run(servicer: AuthorizationServicer, request: external_auth_pb2.CheckRequest) -> Any:
    return CheckResponse.FromString(asyncio.run(servicer.Check(request, None)))


def test_servicer_answers_allow_deny_and_malformed_as_serialized_responses() -> None:
    servicer = AuthorizationServicer(_Checker(), malformed=_malformed)
    allowed = _run(servicer, _check_request("/allow"))
    assert allowed.status.code == 0 and allowed.dynamic_metadata["decision_id"] == "id-1"
    assert [h.header.key for h in allowed.ok_response.headers] == ["x-user"]
    denied = _run(servicer, _check_request("/other"))
    assert denied.status.code == 7 and denied.denied_response.status.code == 403
    malformed = _run(servicer, _check_request(method=""))
    assert malformed.status.code == 3 and malformed.denied_response.status.code == 400
    assert json.loads(malformed.denied_response.body)["decision_id"] == "m-1"


@pytest.mark.parametrize("path", ["/boom", "/unencodable"])
def test_servicer_turns_internal_errors_into_a_deny(path: str, caplog: pytest.LogCaptureFixture) -> None:
    servicer = AuthorizationServicer(_Checker(), malformed=_malformed)
    with caplog.at_level("ERROR", logger="authz.server.grpc"):
        reply = _run(servicer, _check_request(path))
    assert reply.status.code == 7
    assert reply.denied_response.status.code == 403
    assert json.loads(reply.denied_response.body)["reason"] == Reason.INTERNAL_ERROR
    assert "internal error in gRPC Check" in caplog.text


def test_servicer_uses_check_now_and_awaits_check_only_when_it_would_wait() -> None:
    """``check_now`` decides what it can (no coroutine); None sends the request to ``check``; a raise is
    an internal-error deny like any other."""
    checker = _Checker()
    seen: list[str] = []

    def check_now(request: Request) -> Decision | None:
        assert request.http is not None
        seen.append(request.http.path)
        if request.http.path == "/now-boom":
            raise RuntimeError("bug")
        return _allow("now") if request.http.path == "/now" else None

    servicer = AuthorizationServicer(checker, malformed=_malformed, check_now=check_now)
    assert _run(servicer, _check_request("/now")).dynamic_metadata["decision_id"] == "now"
    assert checker.calls == 0
    assert _run(servicer, _check_request("/allow")).dynamic_metadata["decision_id"] == "id-1"
    assert checker.calls == 1
    reply = _run(servicer, _check_request("/now-boom"))
    assert json.loads(reply.denied_response.body)["reason"] == Reason.INTERNAL_ERROR
    assert seen == ["/now", "/allow", "/now-boom"] and checker.calls == 1


@pytest.fixture
async def grpc_stub() -> AsyncIterator[Any]:
    server = grpc.aio.server()
    add_to_server(server, AuthorizationServicer(_Checker(), malformed=_malformed))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield external_auth_pb2_grpc.AuthorizationStub(channel)
    finally:
        await server.stop(0)


async def test_add_to_server_sends_the_handlers_bytes_over_grpc(grpc_stub: Any) -> None:
    allowed = await grpc_stub.Check(_check_request("/allow"), timeout=10)
    assert allowed.status.code == 0
    assert allowed.ok_response.headers[0].header.value == "alice"
    assert list(allowed.ok_response.headers_to_remove) == ["authorization"]
    assert allowed.dynamic_metadata["decision_id"] == "id-1"
    denied = await grpc_stub.Check(_check_request("/deny"), timeout=10)
    assert denied.status.code == 7
    assert json.loads(denied.denied_response.body)["decision_id"] == "id-2"
    boom = await grpc_stub.Check(_check_request("/boom"), timeout=10)
    assert boom.denied_response.status.code == 403


def test_exported_names() -> None:
    assert set(grpc_ext_authz.__all__) == {
        "AuthorizationServicer",
        "Checker",
        "add_to_server",
        "denied_body",
        "request_from_check",
        "response_bytes",
        "response_from_decision",
    }


def test_unhashable_header_operations_are_encoded_uncached() -> None:
    ops = HeaderOps(set=[("x-user", "alice")], remove=["authorization"])  # type: ignore[arg-type]
    decision = _allow("id-l", headers=ops)
    assert CheckResponse.FromString(response_bytes(decision)) == response_from_decision(decision)

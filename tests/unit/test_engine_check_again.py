"""Engine.check_again (check_now for a request value presented again) and Engine.ignorable_headers.

check_again keeps, per request value, what depends on the value and the settings alone; these tests hold
it to deciding every check as an engine that has seen nothing would, across expiry, key rotation, policy
swaps and settings changes, and ignorable_headers to naming only headers no check can read.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.authn import Authenticator
from authz.authn.testing import SigningKey
from authz.clock import FrozenClock
from authz.config import MeshConfig
from authz.engine import PER_REQUEST_HEADERS, Engine
from authz.identity import PeerTrust
from authz.metrics import CHECKS
from authz.request import HttpAttributes, Peer, Request, Workload
from authz.snapshot import Snapshot
from tests.unit.test_engine import (
    FRONTEND,
    ISSUER,
    NOW,
    POLICIES,
    _fields,
    _jwt_policy_text,
    snapshot,
)

KEYS = (SigningKey.generate("ES256", kid="k1"), SigningKey.generate("ES256", kid="k2"))
TOKENS = {
    "none": None,
    "alice": KEYS[0].sign({"iss": ISSUER, "sub": "alice", "exp": NOW + 600}),
    "bob": KEYS[0].sign({"iss": ISSUER, "sub": "bob", "exp": NOW + 600}),
    "alice-k2": KEYS[1].sign({"iss": ISSUER, "sub": "alice", "exp": NOW + 600}),
    "garbage": "garbage",
}
CERT = "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n"


def policy_snapshot(key_index: int, required_sub: str) -> Snapshot:
    text = _jwt_policy_text(KEYS[key_index], required_sub) + "---\n" + POLICIES
    return snapshot(text, mesh=MeshConfig(num_trusted_proxies=1))


def make_engine(snap: Snapshot, clock: FrozenClock) -> Engine:
    return Engine(
        snap,
        mesh=MeshConfig(num_trusted_proxies=1),
        authenticator=Authenticator(settings=snap.authn_settings, clock=clock),
        peer_trust=PeerTrust(trust_xfcc=True),
        clock=clock,
    )


REQUEST_SHAPES = st.tuples(
    st.sampled_from(["", FRONTEND, "spiffe://cluster.local/ns/web/sa/admin"]),
    st.sampled_from(["/", "/a/../b", "/a%00b"]),
    st.sampled_from(["", "203.0.113.7"]),
    st.sampled_from(sorted(TOKENS)),
    st.sampled_from(["plain", "certificate", "xfcc"]),
)


def build(principal: str, path: str, xff: str, token: str, peer: str) -> Request:
    headers = {"x-forwarded-for": xff} if xff else {}
    value = TOKENS[token]
    if value is not None:
        headers["authorization"] = f"Bearer {value}"
    if peer == "xfcc":
        headers["x-forwarded-client-cert"] = f"By=spiffe://cluster.local/ns/orders/sa/orders;URI={FRONTEND}"
    return Request(
        source=Peer(
            address="10.0.0.9", principal=principal, certificate=CERT if peer == "certificate" else ""
        ),
        http=HttpAttributes(method="GET", host="orders", path=path, headers=headers, validated=True),
        context_extensions={"namespace": "orders", "labels": "app=orders"},
    )


STEPS = st.one_of(
    st.tuples(st.just("check"), st.integers(0, 5)),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 700.0])),
    st.tuples(st.just("swap"), st.tuples(st.integers(0, 1), st.sampled_from(["alice", "bob"]))),
    st.tuples(st.just("trust"), st.booleans()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(REQUEST_SHAPES, min_size=1, max_size=6), st.lists(STEPS, min_size=1, max_size=25))
def test_check_again_decides_every_repeat_as_a_fresh_engine(shapes: list[Any], steps: list[Any]) -> None:
    # The same request values, presented again and again while the clock moves (tokens expire), policies
    # and keys are swapped (the token's key leaves) and the peer settings change: each answer equals what
    # an engine that has seen nothing decides now; None only when a token must be verified first.
    async def run() -> None:
        clock = FrozenClock(NOW)
        snap = policy_snapshot(0, "alice")
        warm = make_engine(snap, clock)
        requests = [build(*shape) for shape in shapes]
        for op, arg in steps:
            if op == "advance":
                clock.now += arg
            elif op == "swap":
                snap = policy_snapshot(*arg)
                warm.swap(snap)
            elif op == "trust":
                warm.peer_trust = PeerTrust(trust_xfcc=arg)
            for request in requests if op != "check" else [requests[arg % len(requests)]]:
                fresh = make_engine(snap, clock)
                fresh.peer_trust = warm.peer_trust
                expected = await fresh.check(request)
                again = warm.check_again(request)
                now = warm.check_now(request)
                assert (again is None) == (now is None)  # None exactly when a token must be verified
                if again is None:
                    again = await warm.check(request)
                else:
                    assert now is not None and _fields(now) == _fields(expected)
                assert _fields(again) == _fields(expected), (op, arg)

    asyncio.run(run())


async def test_check_again_answers_a_repeat_from_what_it_kept_and_counts_it() -> None:
    clock = FrozenClock(NOW)
    e = make_engine(policy_snapshot(0, "alice"), clock)
    request = build(FRONTEND, "/", "", "alice", "plain")
    assert e.check_again(request) is None  # never verified
    first = await e.check(request)
    allowed = CHECKS.labels(decision="allow", reason="allowed_by_policy")
    before = allowed.value
    answers = [e.check_again(request) for _ in range(3)]
    assert all(a is not None and _fields(a) == _fields(first) for a in answers)
    assert len({a.decision_id for a in answers if a is not None} | {first.decision_id}) == 4
    assert allowed.value == before + 3
    assert id(request) in e._replays  # kept: the repeats were answered from it
    clock.now = NOW + 3600  # expired: the kept decision is not used, the token must be verified again
    assert e.check_again(request) is None
    assert (await e.check(request)).status == 401


async def test_check_again_keeps_nothing_for_time_dependent_peers_or_bound_tokens() -> None:
    clock = FrozenClock(NOW)
    e = make_engine(policy_snapshot(0, "alice"), clock)
    for peer in ("certificate", "xfcc"):
        request = build("", "/", "", "alice", peer)
        await e.check(request)
        e.check_again(request)
        assert id(request) not in e._replays, peer


def test_ignorable_headers_are_the_per_request_ones_nothing_reads() -> None:
    e = make_engine(policy_snapshot(0, "alice"), FrozenClock(NOW))
    everything = e.ignorable_headers()
    assert everything == PER_REQUEST_HEADERS
    assert e.ignorable_headers() is everything  # kept while nothing changes
    e.swap(policy_snapshot(0, "bob"))
    assert e.ignorable_headers() is everything  # a new policy set reading the same headers: same object
    reads = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-id, namespace: orders}
spec:
  action: DENY
  rules:
  - when: [{key: "request.headers[X-Request-Id]", values: ["bad"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-trace, namespace: orders}
spec:
  rules:
  - to: [{operation: {paths: ["/"]}}]
    from: [{source: {principals: ["*"]}}]
    when: [{key: "request.headers[traceparent]", notValues: ["x"]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: from-b3, namespace: orders}
spec:
  jwtRules: [{issuer: "https://other.test", jwksUri: "https://other.test/jwks", fromHeaders: [{name: B3}]}]
"""
    e.swap(snapshot(reads))
    narrowed = e.ignorable_headers()
    assert narrowed == PER_REQUEST_HEADERS - {"x-request-id", "traceparent", "b3"}
    e.peer_trust = PeerTrust(xfcc_header="X-Amzn-Trace-Id")
    assert e.ignorable_headers() == narrowed - {"x-amzn-trace-id"}


def test_a_cookie_rule_makes_the_cookie_header_read() -> None:
    text = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: c, namespace: orders}
spec:
  jwtRules: [{issuer: "https://other.test", jwksUri: "https://other.test/jwks", fromCookies: [session]}]
"""
    assert "cookie" in snapshot(text).headers_read()


def test_default_token_location_is_read() -> None:
    assert "authorization" in policy_snapshot(0, "alice").headers_read()


def test_check_again_follows_the_default_workload() -> None:
    clock = FrozenClock(NOW)
    e = make_engine(policy_snapshot(0, "alice"), clock)
    request = dataclasses.replace(build(FRONTEND, "/", "", "none", "plain"), context_extensions={})
    e.default_workload = Workload(namespace="orders", labels={"app": "orders"})
    first = e.check_again(request)
    e.default_workload = Workload(namespace="elsewhere")
    second = e.check_again(request)
    assert first is not None and second is not None
    fresh = make_engine(policy_snapshot(0, "alice"), clock)
    fresh.default_workload = Workload(namespace="elsewhere")
    expected = fresh.check_now(request)
    assert expected is not None and _fields(second) == _fields(expected)

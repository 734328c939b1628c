"""Router (host precedence, first match, matchers, rewrite) and the pure pickers (weights, LB, retry,
outlier, peer authentication mode, trace headers)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.proxy.lb import Endpoint, LoadBalancer, pick_weighted
from authz.proxy.loader import parse_resources
from authz.proxy.mirror import shadow_authority
from authz.proxy.model import OutlierDetection, PeerAuthentication, RetryPolicy
from authz.proxy.outlier import OutlierDetector
from authz.proxy.retry import Outcome, backoff, should_retry
from authz.proxy.router import Router, rewrite_target, split_authority
from authz.proxy.sidecar import peer_authentication_mode
from authz.proxy.telemetry import child_trace_headers, request_id
from authz.request import Workload
from authz.resources import parse_documents


def router(http: str, hosts: str = "[reviews]", extra: str = "") -> Router:
    text = f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: r, namespace: default}}
spec:
  hosts: {hosts}
  http:
{http}{extra}"""
    return Router(parse_resources(parse_documents(text, "t.yaml")).mesh)


def name_of(
    r: Router, authority: str, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None
) -> str:
    m = r.route(authority, method, path, headers or {})
    return "NR" if m is None else m.route.name


def test_first_match_wins_and_no_match_is_none() -> None:
    r = router(
        "  - name: a\n    match: [{uri: {prefix: /api}}]\n    route: [{destination: {host: x}}]\n"
        "  - name: b\n    match: [{uri: {prefix: /api/v2}}]\n    route: [{destination: {host: x}}]\n"
    )
    assert name_of(r, "reviews", "/api/v2/x") == "a"
    assert name_of(r, "reviews", "/other") == "NR"
    assert name_of(r, "unknown", "/api") == "NR"


def test_host_forms_and_port_are_accepted() -> None:
    r = router("  - name: a\n    route: [{destination: {host: x}}]\n")
    for authority in ("reviews", "reviews:9080", "reviews.default", "reviews.default.svc.cluster.local:80"):
        assert name_of(r, authority) == "a"


def test_exact_host_beats_longest_wildcard_beats_catch_all() -> None:
    text = ""
    for i, host in enumerate(["'*'", "'*.example.com'", "'*.api.example.com'", "a.api.example.com"]):
        text += f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: v{i}, namespace: default}}
spec:
  hosts: [{host}]
  http: [{{name: r{i}, route: [{{destination: {{host: x}}}}]}}]
"""
    r = Router(parse_resources(parse_documents(text, "t.yaml")).mesh)
    assert name_of(r, "a.api.example.com") == "r3"
    assert name_of(r, "b.api.example.com") == "r2"
    assert name_of(r, "c.example.com") == "r1"
    assert name_of(r, "other.org") == "r0"


def test_matchers_and_or_semantics() -> None:
    r = router(
        "  - name: m\n    match:\n"
        "    - {uri: {exact: /Login}, ignoreUriCase: true, method: {exact: POST}}\n"
        "    - {headers: {x-user: {regex: 'a.c'}, x-flag: {}}, withoutHeaders: {x-block: {prefix: y}}}\n"
        "    - {queryParams: {v: {regex: '\\d+'}}}\n"
        "    route: [{destination: {host: x}}]\n"
    )
    assert name_of(r, "reviews", "/login?x=1", "POST") == "m"  # query is not part of uri
    assert name_of(r, "reviews", "/login", "GET") == "NR"
    assert name_of(r, "reviews", "/", headers={"x-user": "abc", "x-flag": ""}) == "m"
    assert name_of(r, "reviews", "/", headers={"x-user": "abcd", "x-flag": ""}) == "NR"  # full-string regex
    assert name_of(r, "reviews", "/", headers={"x-user": "abc"}) == "NR"  # presence required
    assert name_of(r, "reviews", "/", headers={"x-user": "abc", "x-flag": "", "x-block": "yes"}) == "NR"
    assert name_of(r, "reviews", "/p?v=123") == "m"
    assert name_of(r, "reviews", "/p?v=a123") == "NR"


def test_rewrite_replaces_prefix_or_whole_path_and_keeps_query() -> None:
    assert rewrite_target("/api/v1/items?q=1", "/v2/", "/api/v1/") == "/v2/items?q=1"
    assert rewrite_target("/exact?q=1", "/new", None) == "/new?q=1"
    assert rewrite_target("/api", "", "/api") == "/"


def test_split_authority_and_shadow_host() -> None:
    assert split_authority("Example.COM:8080") == ("example.com", 8080)
    assert split_authority("[::1]:80") == ("[::1]", 80)
    assert shadow_authority("svc:8080") == "svc-shadow:8080"
    assert shadow_authority("svc") == "svc-shadow"


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=5).filter(
        lambda w: sum(w) > 0
    ),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_weighted_picks_converge_to_their_weights(weights: list[int], seed: int) -> None:
    rng = random.Random(seed)
    n = 4000
    counts = [0] * len(weights)
    for _ in range(n):
        counts[pick_weighted(list(range(len(weights))), weights, rng)] += 1
    total = sum(weights)
    for w, c in zip(weights, counts, strict=True):
        if w == 0:
            assert c == 0
        else:
            assert abs(c / n - w / total) < 0.05


EPS = [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)]


def test_round_robin_cycles() -> None:
    lb = LoadBalancer("ROUND_ROBIN")
    rng = random.Random(1)
    assert [lb.pick(EPS, rng).address for _ in range(4)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]


def test_least_request_p2c_never_picks_the_busiest_of_two() -> None:
    lb = LoadBalancer()
    rng = random.Random(3)
    active = {"10.0.0.1:80": 10, "10.0.0.2:80": 0, "10.0.0.3:80": 5}
    picks = [lb.pick(EPS, rng, active=active).address for _ in range(300)]
    assert "10.0.0.1" not in picks  # it is the busier one of every pair it can be in
    assert picks.count("10.0.0.2") > picks.count("10.0.0.3")


@settings(max_examples=30, deadline=None)
@given(key=st.text(max_size=20))
def test_consistent_hash_moves_only_keys_of_a_removed_host(key: str) -> None:
    lb = LoadBalancer(hash_header="x-user")
    rng = random.Random(0)
    before = lb.pick(EPS, rng, hash_key=key)
    assert lb.pick(EPS, rng, hash_key=key) == before
    remaining = [e for e in EPS if e != EPS[2]]
    after = lb.pick(remaining, rng, hash_key=key)
    if before != EPS[2]:
        assert after == before


POLICY = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}))


@pytest.mark.parametrize(
    ("retry_on", "outcome", "expected"),
    [
        ({"5xx"}, Outcome(status=503), True),
        ({"5xx"}, Outcome(status=404), False),
        ({"5xx"}, Outcome(failure="reset"), True),
        ({"5xx"}, Outcome(failure="timeout"), True),
        ({"gateway-error"}, Outcome(status=500), False),
        ({"gateway-error"}, Outcome(status=504), True),
        ({"gateway-error"}, Outcome(failure="timeout"), True),
        ({"connect-failure"}, Outcome(failure="connect_failure"), True),
        ({"connect-failure"}, Outcome(failure="reset"), False),
        ({"reset"}, Outcome(failure="connect_failure"), True),
        ({"reset"}, Outcome(status=503), False),  # a 503 response is not a reset
        ({"retriable-4xx"}, Outcome(status=409), True),
        ({"5xx"}, Outcome(failure="overflow"), False),
        ({"unavailable"}, Outcome(status=200, grpc_status="14"), True),
        ({"cancelled"}, Outcome(status=200, grpc_status="14"), False),
    ],
)
def test_should_retry_conditions(retry_on: set[str], outcome: Outcome, expected: bool) -> None:
    policy = RetryPolicy(attempts=2, retry_on=frozenset(retry_on))
    assert should_retry(0, outcome, policy) is expected


def test_should_retry_respects_attempts_and_status_codes() -> None:
    policy = RetryPolicy(
        attempts=1, retry_on=frozenset({"retriable-status-codes"}), status_codes=frozenset({418})
    )
    assert should_retry(0, Outcome(status=418), policy)
    assert not should_retry(1, Outcome(status=418), policy)
    assert not should_retry(0, Outcome(status=503), None)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(min_value=1, max_value=20), seed=st.integers(min_value=0, max_value=1000))
def test_backoff_is_jittered_within_envoy_bounds(n: int, seed: int) -> None:
    wait = backoff(n, 0.025, random.Random(seed))
    assert 0 <= wait <= min((2**n - 1) * 0.025, 0.25)


def test_outlier_ejects_after_consecutive_5xx_and_returns_later() -> None:
    det = OutlierDetector(
        OutlierDetection(consecutive_5xx=3, base_ejection_time=30, max_ejection_percent=50), 4
    )
    assert not det.record("a", 500, now=0) and not det.record("a", 502, now=1)
    assert not det.record("a", 200, now=1)  # success resets the streak
    assert [det.record("a", None, now=2) for _ in range(3)] == [False, False, True]
    assert det.is_ejected("a", now=10)
    assert [e.key for e in det.healthy([Endpoint("a", 0), Endpoint("b", 0)], now=10)] != []
    assert not det.is_ejected("a", now=33)  # 30 s base ejection time
    for _ in range(3):
        det.record("b", 500, now=40)
    for _ in range(3):
        det.record("c", 500, now=40)
    assert det.ejected_count(now=41) == 2  # 50% of 4 hosts
    for _ in range(3):
        det.record("a", 500, now=41)
    assert not det.is_ejected("a", now=42)


def test_no_outlier_policy_never_ejects() -> None:
    det = OutlierDetector(None, 2)
    assert not any(det.record("a", 500, now=0) for _ in range(100))


def pa(name: str, ns: str, mode: str, selector: dict[str, str] | None = None) -> PeerAuthentication:
    return PeerAuthentication(name, ns, selector, mode)  # type: ignore[arg-type]


def test_peer_authentication_precedence() -> None:
    wl = Workload(namespace="shop", labels={"app": "web"})
    mode = peer_authentication_mode
    assert mode((), wl, root_namespace="istio-system") == "PERMISSIVE"
    mesh = pa("m", "istio-system", "STRICT")
    assert mode((mesh,), wl, root_namespace="istio-system") == "STRICT"
    ns = pa("n", "shop", "DISABLE")
    assert mode((mesh, ns), wl, root_namespace="istio-system") == "DISABLE"
    unset = pa("w", "shop", "UNSET", {"app": "web"})
    assert mode((mesh, ns, unset), wl, root_namespace="istio-system") == "DISABLE"  # UNSET inherits
    wk = pa("w2", "shop", "STRICT", {"app": "web"})
    assert mode((mesh, ns, wk), wl, root_namespace="istio-system") == "STRICT"
    other = pa("o", "shop", "STRICT", {"app": "db"})
    assert mode((ns, other), wl, root_namespace="istio-system") == "DISABLE"


def test_trace_headers_make_a_child_span() -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    out = dict(
        child_trace_headers(
            {"traceparent": parent, "x-b3-traceid": "463ac35c9f6413ad", "x-b3-spanid": "a2fb4a1d1a96d312"}
        )
    )
    version, trace, span, flags = out["traceparent"].split("-")
    assert (version, trace, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span != "b7ad6b7169203331" and len(span) == 16
    assert out["x-b3-parentspanid"] == "a2fb4a1d1a96d312"
    fresh = dict(child_trace_headers({"traceparent": "garbage"}))["traceparent"].split("-")
    assert len(fresh[1]) == 32 and fresh[1] != "0af7651916cd43dd8448eb211c80319c"


def test_request_id_is_kept_or_made() -> None:
    assert request_id("abc") == "abc"
    made = request_id(None)
    assert len(made) == 36 and made != request_id(None)
    assert request_id("bad\nid") != "bad\nid"

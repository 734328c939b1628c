"""Endpoint weights in the load balancers (Envoy ``load_balancing_weight`` semantics), with a seeded rng."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from authz.proxy.cluster import ClusterKey, ClusterManager
from authz.proxy.lb import EdfScheduler, Endpoint, LoadBalancer
from authz.proxy.loader import parse_resources
from authz.resources import parse_documents

weight_lists = st.lists(st.integers(min_value=1, max_value=20), min_size=2, max_size=6)


def endpoints(weights: list[int]) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}", 80, weight=w) for i, w in enumerate(weights)]


def counts(lb: LoadBalancer, eps: list[Endpoint], picks: int, **kw: object) -> list[int]:
    rng = random.Random(7)
    seen = Counter(lb.pick(eps, rng, **kw).key for _ in range(picks))  # type: ignore[arg-type]
    return [seen[e.key] for e in eps]


@settings(max_examples=40, deadline=None)
@given(weight_lists, st.integers(min_value=1, max_value=5))
def test_weighted_round_robin_tracks_the_weights_within_one_pick_per_host(
    weights: list[int], rounds: int
) -> None:
    """EDF: after N picks every host's count is within n (hosts) of N * w / W, at every N, and after whole
    rounds of W picks it is within one pick of exact."""
    eps = endpoints(weights)
    lb = LoadBalancer("ROUND_ROBIN", weighted=True)
    total = sum(weights)
    seen = Counter[str]()
    rng = random.Random(0)
    for n in range(1, rounds * total + 1):
        seen[lb.pick(eps, rng).key] += 1
        for e in eps:
            assert abs(seen[e.key] - n * e.weight / total) <= len(eps)
    for e in eps:
        assert abs(seen[e.key] - rounds * e.weight) <= 1


@settings(max_examples=40, deadline=None)
@given(weight_lists)
def test_weighted_least_request_without_load_follows_the_weights(weights: list[int]) -> None:
    eps = endpoints(weights)
    total = sum(weights)
    got = counts(LoadBalancer("LEAST_REQUEST", weighted=True), eps, 10 * total)
    for c, w in zip(got, weights, strict=True):
        assert abs(c - 10 * w) <= len(eps)


def test_weighted_least_request_divides_the_weight_by_active_requests_plus_one() -> None:
    """Envoy: ``weight / (active + 1)``. Weights 4:1 with 3 requests active on the heavy host and none on the
    light one: dynamic weights 1:1, so the picks split evenly instead of 4:1."""
    eps = endpoints([4, 1])
    got = counts(LoadBalancer("LEAST_REQUEST", weighted=True), eps, 1000, active={eps[0].key: 3})
    assert got == [500, 500]
    idle = counts(LoadBalancer("LEAST_REQUEST", weighted=True), eps, 1000)
    assert idle == [800, 200]


def test_random_ignores_endpoint_weights_as_envoy_does() -> None:
    """Envoy's RandomLoadBalancer picks ``hosts[random % size]``: weights 1:9 still split about evenly
    (checked against Envoy 1.40 in the oracle test)."""
    eps = endpoints([1, 9])
    got = counts(LoadBalancer("RANDOM", weighted=True), eps, 4000)
    assert all(1800 <= c <= 2200 for c in got), got


@settings(max_examples=15, deadline=None)
@given(weight_lists)
def test_weighted_consistent_hash_shares_keys_by_weight_and_is_sticky(weights: list[int]) -> None:
    eps = endpoints(weights)
    lb = LoadBalancer(hash_header="x-user", weighted=True)
    rng = random.Random(0)
    keys = [f"user-{i}" for i in range(3000)]
    owner = {k: lb.pick(eps, rng, hash_key=k).key for k in keys}
    assert all(lb.pick(eps, rng, hash_key=k).key == owner[k] for k in keys[:100])  # sticky
    share = Counter(owner.values())
    total = sum(weights)
    for e in eps:
        expected = len(keys) * e.weight / total
        assert abs(share[e.key] - expected) <= 0.25 * expected + 40, (weights, share)
    # removing a host moves only its keys
    gone = eps[0]
    rest = eps[1:]
    for k in keys[:300]:
        if owner[k] != gone.key:
            assert lb.pick(rest, rng, hash_key=k).key == owner[k]


def test_equal_weights_keep_the_unweighted_pickers() -> None:
    eps = endpoints([3, 3, 3])
    lb = LoadBalancer("ROUND_ROBIN")
    assert [lb.pick(eps, random.Random(0)).address for _ in range(4)] == [
        "10.0.0.0",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.0",
    ]


def test_edf_scheduler_orders_by_deadline_then_insertion() -> None:
    weights = [1.0, 2.0]
    edf = EdfScheduler(weights)
    assert [edf.pick_and_add(weights) for _ in range(6)] == [1, 0, 1, 1, 0, 1]


def test_retry_subsets_keep_their_own_schedule() -> None:
    """A retry picks from the hosts not yet tried; that reduced set gets its own schedule and the main
    schedule keeps its place."""
    eps = endpoints([1, 3])
    lb = LoadBalancer("ROUND_ROBIN", weighted=True)
    rng = random.Random(0)
    first = [lb.pick(eps, rng).key for _ in range(2)]
    assert lb.pick(eps[:1], rng) is eps[0]  # a single host: no schedule needed
    assert lb.pick([eps[0], Endpoint("10.9.9.9", 80, weight=5)], rng).address in ("10.0.0.0", "10.9.9.9")
    rest = [lb.pick(eps, rng).key for _ in range(6)]
    assert Counter(first + rest) == Counter({eps[0].key: 2, eps[1].key: 6})


MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc, namespace: default}
spec:
  hosts: [svc.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, weight: 1}
  - {address: 10.0.0.2, weight: 3}
  - {address: 10.0.0.3, weight: 0}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc, namespace: default}
spec:
  host: svc.example.com
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"""


def test_service_entry_weights_reach_the_cluster_balancer() -> None:
    mesh = parse_resources(parse_documents(MESH, "t.yaml")).mesh
    assert [e.weight for e in mesh.service_entries[0].endpoints] == [1, 3, 1]  # 0 = unset = 1
    cluster = ClusterManager(mesh, ssl_context=lambda: None, trust_domain="cluster.local").get(
        ClusterKey("svc.example.com", None)
    )
    assert cluster.lb.weighted
    got = Counter(cluster.choose([], None).address for _ in range(50))
    assert got == Counter({"10.0.0.1": 10, "10.0.0.2": 30, "10.0.0.3": 10})

"""Pure pickers: weighted destination choice and endpoint load balancing, driven by an injected rng.

``pick(endpoints, rng, ...)`` never touches a socket; the cluster passes the live request counts in.

Endpoint weights (``ServiceEntry.endpoints[].weight``, Envoy ``load_balancing_weight``) are honoured the way
Envoy's load balancers do (envoy ``source/common/upstream/load_balancer_impl.cc``, checked against Envoy 1.40
in ``tests/integration/test_proxy_oracle.py``):

* ROUND_ROBIN: weighted round robin on an earliest-deadline-first schedule (``EdfLoadBalancerBase``): each
  host's next deadline is ``now + 1/weight``, so over any stretch of picks a host's share tracks its weight.
* LEAST_REQUEST: with equal weights, power of two choices; with unequal weights, the same EDF schedule with
  the dynamic weight ``weight / (active_requests + 1)`` (``LeastRequestLoadBalancer::hostWeight`` with the
  default ``active_request_bias`` 1.0), recomputed for the picked host each time it is re-scheduled.
* RANDOM: a uniformly random host; Envoy's ``RandomLoadBalancer`` ignores endpoint weights, and so do we.
* Consistent hash: weighted rendezvous hashing (score ``weight / -ln(h)``), the same key keeps its host while
  it is healthy and each host owns a share of the keys proportional to its weight (Envoy's ring hash gives a
  host ring entries in proportion to its weight).

When every endpoint has the same weight nothing of this runs: the cluster builds the balancer unweighted.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from authz.request import EMPTY_MAP

__all__ = ["EdfScheduler", "Endpoint", "LoadBalancer", "pick_weighted"]

T = TypeVar("T")

MAX_SCHEDULERS = 16
"""Weighted schedules kept per balancer, one per distinct host set (all healthy hosts, hosts not yet tried
by a retry, ...). Envoy rebuilds its schedule when the host set changes; we keep the few recent ones so a
retry's reduced set does not reset the main schedule."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream host of a cluster. ``key`` is ``address:port``; ``identity`` the expected SPIFFE ID;
    ``weight`` the ``ServiceEntry`` endpoint weight (Envoy ``load_balancing_weight``, default 1)."""

    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    identity: str = ""
    tls: bool = False
    weight: int = 1
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.address}:{self.port}")  # computed once: read per request


def pick_weighted(items: Sequence[T], weights: Sequence[int], rng: random.Random) -> T:
    """Choose ``items[i]`` with probability ``weights[i] / sum(weights)`` (VS l.940-955); ``weight: 0`` never.

    Per request, not sticky. Bisect over the cumulative weights (spec §3.6: 0.1-0.2 µs).
    """
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    if total <= 0:
        raise ValueError("weights add up to 0")
    roll = rng.randrange(total)
    return items[bisect.bisect_right(cumulative, roll)]


class EdfScheduler:
    """Envoy's ``EdfScheduler`` (``source/common/upstream/edf_scheduler.h``): every entry has a deadline
    ``current_time + 1 / weight``; ``pick_and_add`` takes the earliest deadline (ties: first added first),
    advances ``current_time`` to it and re-schedules that entry with its weight *now*."""

    def __init__(self, weights: Sequence[float]) -> None:
        self._now = 0.0
        self._order = itertools.count()
        self._queue: list[tuple[float, int, int]] = []
        for index, weight in enumerate(weights):
            self._push(index, weight)

    def _push(self, index: int, weight: float) -> None:
        heapq.heappush(self._queue, (self._now + 1.0 / weight, next(self._order), index))

    def pick_and_add(self, weights: Sequence[float]) -> int:
        """The index of the next entry; it is re-added with ``weights[index]`` (its current weight)."""
        deadline, _, index = heapq.heappop(self._queue)
        self._now = deadline
        self._push(index, weights[index])
        return index


class LoadBalancer:
    """DR ``loadBalancer``: LEAST_REQUEST (power of two choices, Istio's default), ROUND_ROBIN, RANDOM, or a
    consistent hash on a request header (rendezvous hashing: the same key keeps its host while it is healthy,
    and only the keys of a removed host move). ``weighted``: the endpoints' weights differ (see the module
    docstring); the cluster sets it once, so equal weights cost nothing per pick."""

    def __init__(
        self, simple: str = "LEAST_REQUEST", hash_header: str = "", *, weighted: bool = False
    ) -> None:
        self.simple = simple
        self.hash_header = hash_header
        self.weighted = weighted
        self._next = 0
        self._schedules: dict[tuple[str, ...], EdfScheduler] = {}

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        rng: random.Random,
        *,
        active: Mapping[str, int] = EMPTY_MAP,
        hash_key: str | None = None,
    ) -> Endpoint:
        if not endpoints:
            raise ValueError("no endpoints to pick from")
        n = len(endpoints)
        if n == 1:
            return endpoints[0]
        if self.hash_header and hash_key is not None:
            if self.weighted:
                return max(endpoints, key=lambda e: _weighted_rendezvous(hash_key, e))
            return max(endpoints, key=lambda e: _rendezvous(hash_key, e.key))
        if self.simple == "RANDOM":  # Envoy RandomLoadBalancer: uniform, endpoint weights ignored
            return endpoints[rng.randrange(n)]
        if self.weighted:
            return self._pick_edf(endpoints, active)
        if self.simple == "ROUND_ROBIN":
            chosen = endpoints[self._next % n]
            self._next += 1
            return chosen
        # Envoy LEAST_REQUEST with equal weights: P2C, pick two distinct hosts, keep the less loaded.
        i = rng.randrange(n)
        j = rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = endpoints[i], endpoints[j]
        return b if active.get(b.key, 0) < active.get(a.key, 0) else a

    def _pick_edf(self, endpoints: Sequence[Endpoint], active: Mapping[str, int]) -> Endpoint:
        least_request = self.simple != "ROUND_ROBIN"
        if least_request:  # weight / (active_requests + 1)^1.0 (Envoy LeastRequestLoadBalancer::hostWeight)
            weights = [e.weight / (active.get(e.key, 0) + 1) for e in endpoints]
        else:
            weights = [float(e.weight) for e in endpoints]
        hosts = tuple(e.key for e in endpoints)
        schedule = self._schedules.get(hosts)
        if schedule is None:
            if len(self._schedules) >= MAX_SCHEDULERS:
                del self._schedules[next(iter(self._schedules))]
            schedule = self._schedules[hosts] = EdfScheduler(weights)
        return endpoints[schedule.pick_and_add(weights)]


def _rendezvous(key: str, host: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _weighted_rendezvous(key: str, endpoint: Endpoint) -> float:
    """Weighted rendezvous hashing (Schindelhauer and Schomaker): ``weight / -ln(h)``, ``h`` uniform in
    (0, 1) from the key and the host; the highest score wins, each host with probability weight/total."""
    h = (_rendezvous(key, endpoint.key) + 0.5) / 2.0**64
    return endpoint.weight / -math.log(h)

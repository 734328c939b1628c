"""Pure pickers: weighted destination choice and endpoint load balancing, driven by an injected rng.

``pick(endpoints, rng, ...)`` never touches a socket; the cluster passes the live request counts in.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from authz.request import EMPTY_MAP

__all__ = ["Endpoint", "LoadBalancer", "pick_weighted"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream host of a cluster. ``key`` is ``address:port``; ``identity`` the expected SPIFFE ID."""

    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    identity: str = ""
    tls: bool = False
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


class LoadBalancer:
    """DR ``loadBalancer``: LEAST_REQUEST (power of two choices, Istio's default), ROUND_ROBIN, RANDOM, or a
    consistent hash on a request header (rendezvous hashing: the same key keeps its host while it is healthy,
    and only the keys of a removed host move)."""

    def __init__(self, simple: str = "LEAST_REQUEST", hash_header: str = "") -> None:
        self.simple = simple
        self.hash_header = hash_header
        self._next = 0

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
            return max(endpoints, key=lambda e: _rendezvous(hash_key, e.key))
        if self.simple == "ROUND_ROBIN":
            chosen = endpoints[self._next % n]
            self._next += 1
            return chosen
        if self.simple == "RANDOM":
            return endpoints[rng.randrange(n)]
        # Envoy LEAST_REQUEST with equal weights: P2C, pick two distinct hosts, keep the less loaded.
        i = rng.randrange(n)
        j = rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = endpoints[i], endpoints[j]
        return b if active.get(b.key, 0) < active.get(a.key, 0) else a


def _rendezvous(key: str, host: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")

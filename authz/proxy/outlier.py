"""Outlier detection (DR ``outlierDetection``): eject hosts after consecutive 5xx; pure, ``now`` passed in.

Envoy semantics: a host is ejected as soon as its consecutive-5xx counter reaches the threshold (locally
originated failures count as 5xx, Istio's ``consecutive5xxErrors``), for ``baseEjectionTime × times ejected``,
never ejecting more than ``maxEjectionPercent`` of the hosts (at least one, as Envoy does). Ejected hosts
return when their time is up (checked lazily instead of on an ``interval`` sweep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from authz.proxy.lb import Endpoint
from authz.proxy.model import OutlierDetection

__all__ = ["OutlierDetector"]


@dataclass(slots=True)
class _HostState:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    times_ejected: int = 0
    ejected_until: float | None = None


class OutlierDetector:
    def __init__(self, policy: OutlierDetection | None, host_count: int) -> None:
        self.policy = policy
        self.host_count = host_count
        self._hosts: dict[str, _HostState] = {}

    def record(self, host: str, status: int | None, *, now: float) -> bool:
        """Account one result (``status`` None = connect failure or reset); True if ``host`` got ejected."""
        p = self.policy
        if p is None:
            return False
        st = self._hosts.setdefault(host, _HostState())
        error = status is None or status >= 500
        gateway = status is None or status in (502, 503, 504)
        st.consecutive_5xx = st.consecutive_5xx + 1 if error else 0
        st.consecutive_gateway = st.consecutive_gateway + 1 if gateway else 0
        tripped = (p.consecutive_5xx and st.consecutive_5xx >= p.consecutive_5xx) or (
            p.consecutive_gateway_errors and st.consecutive_gateway >= p.consecutive_gateway_errors
        )
        if not tripped or self.is_ejected(host, now=now):
            return False
        if self.ejected_count(now=now) >= self._max_ejected():
            return False
        st.times_ejected += 1
        st.ejected_until = now + p.base_ejection_time * st.times_ejected
        st.consecutive_5xx = 0
        st.consecutive_gateway = 0
        return True

    def _max_ejected(self) -> int:
        assert self.policy is not None
        if self.policy.max_ejection_percent <= 0:
            return 0
        return max(1, self.host_count * self.policy.max_ejection_percent // 100)

    def is_ejected(self, host: str, *, now: float) -> bool:
        st = self._hosts.get(host)
        if st is None or st.ejected_until is None:
            return False
        if now >= st.ejected_until:
            st.ejected_until = None
            return False
        return True

    def ejected_count(self, *, now: float) -> int:
        return sum(1 for h in list(self._hosts) if self.is_ejected(h, now=now))

    def healthy(self, endpoints: Sequence[Endpoint], *, now: float) -> list[Endpoint]:
        """The endpoints not ejected; all of them if every one is ejected (Envoy's panic mode)."""
        if self.policy is None:
            return list(endpoints)
        kept = [e for e in endpoints if not self.is_ejected(e.key, now=now)]
        return kept or list(endpoints)

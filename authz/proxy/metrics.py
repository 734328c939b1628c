"""The proxy's Prometheus metrics, in Istio's standard names (its own registry, served on the admin port).

Istio standard metrics: ``istio_requests_total`` (COUNTER) and ``istio_request_duration_milliseconds``
(DISTRIBUTION), labelled with reporter, source/destination and ``response_code``/``response_flags``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["LABELS", "ProxyMetrics"]

LABELS = (
    "reporter",
    "source_workload_namespace",
    "source_principal",
    "destination_service",
    "destination_workload_namespace",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
)


class ProxyMetrics:
    """One registry per proxy instance, so tests and several proxies in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "istio_requests", "Requests handled by the proxy", LABELS, registry=self.registry
        )
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration as seen by the proxy",
            LABELS,
            buckets=(0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000),
            registry=self.registry,
        )
        self.mirror_requests = Counter(
            "meshauthz_proxy_mirror_requests",
            "Mirrored requests by route and result",
            ["route", "result"],
            registry=self.registry,
        )
        self.mirror_mismatches = Counter(
            "meshauthz_proxy_mirror_mismatches",
            "Mirror responses that differ from the primary's, by route and what differed",
            ["route", "field"],
            registry=self.registry,
        )
        self.authz = Counter(
            "meshauthz_proxy_authz_checks",
            "Inbound authorization checks by result",
            ["result"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "meshauthz_proxy_config_reloads", "Config reloads by result", ["result"], registry=self.registry
        )

    def record(self, labels: dict[str, str], duration_ms: float) -> None:
        self.requests.labels(**labels).inc()
        self.duration.labels(**labels).observe(duration_ms)

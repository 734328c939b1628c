"""The proxy's Prometheus metrics, in Istio's standard names (its own registry, served on the admin port).

Istio standard metrics: ``istio_requests_total`` (COUNTER) and ``istio_request_duration_milliseconds``
(DISTRIBUTION), labelled with reporter, source/destination and ``response_code``/``response_flags``.
The per-request ones (requests, duration, authorization checks) are :mod:`authz.loop_metrics`: plain
numbers updated from the proxy's event loop, with the same exposition as ``prometheus_client``'s.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from authz.loop_metrics import Counter as LoopCounter
from authz.loop_metrics import CounterChild, HistogramChild
from authz.loop_metrics import Histogram as LoopHistogram

__all__ = ["LABELS", "MAX_CACHED_SERIES", "ProxyMetrics"]

MAX_CACHED_SERIES = 4096
"""Labelled children kept for reuse; past this many the cache starts over (the series stay registered)."""

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
        self.requests = LoopCounter(
            "istio_requests", "Requests handled by the proxy", LABELS, registry=self.registry
        )
        self.duration = LoopHistogram(
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
        self.authz = LoopCounter(
            "meshauthz_proxy_authz_checks",
            "Inbound authorization checks by result",
            ["result"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "meshauthz_proxy_config_reloads", "Config reloads by result", ["result"], registry=self.registry
        )

        self._series: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def record(self, labels: dict[str, str], duration_ms: float) -> None:
        """Count one request; ``labels`` maps every name of :data:`LABELS` to its value."""
        self.record_values(tuple(labels[name] for name in LABELS), duration_ms)

    def record_values(self, values: tuple[str, ...], duration_ms: float) -> None:
        """Count one request; ``values`` in :data:`LABELS` order. The labelled children are looked up once
        per distinct series (``labels()`` costs several µs; the hot path pays a dict lookup)."""
        series = self.series(values)
        series[0].inc()
        series[1].observe(duration_ms)

    def series(self, values: tuple[str, ...]) -> tuple[CounterChild, HistogramChild]:
        """The request counter and duration histogram of one label set (``values`` in :data:`LABELS`
        order), looked up once per distinct set."""
        series = self._series.get(values)
        if series is None:
            if len(self._series) >= MAX_CACHED_SERIES:
                self._series.clear()
            series = (self.requests.labels(*values), self.duration.labels(*values))
            self._series[values] = series
        return series

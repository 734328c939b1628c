"""Prometheus metrics, one registry per process, served by the admin endpoint at ``/metrics``.

The ones every check updates (checks, check duration, token cache lookups) are :mod:`authz.loop_metrics`
(plain numbers updated from the event loop, the same exposition); the rest are ``prometheus_client``'s.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from authz import loop_metrics

__all__ = [
    "CHECKS",
    "CHECK_LATENCY",
    "INTERNAL_ERRORS",
    "JWKS_FETCHES",
    "POLICY_GENERATION",
    "POLICY_RELOADS",
    "REGISTRY",
    "TOKEN_CACHE",
]

REGISTRY = CollectorRegistry(auto_describe=True)

CHECKS = loop_metrics.Counter(
    "meshauthz_checks",
    "Authorization checks by decision and reason",
    ["decision", "reason"],
    registry=REGISTRY,
)
CHECK_LATENCY = loop_metrics.Histogram(
    "meshauthz_check_duration_seconds",
    "Time to decide one check, from request received to decision built",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
    registry=REGISTRY,
)
INTERNAL_ERRORS = Counter(
    "meshauthz_internal_errors",
    "Checks that failed with an internal error (denied: fail closed)",
    ["front"],
    registry=REGISTRY,
)
POLICY_RELOADS = Counter(
    "meshauthz_policy_reloads",
    "Policy reloads by result (ok, error)",
    ["result"],
    registry=REGISTRY,
)
POLICY_GENERATION = Gauge(
    "meshauthz_policy_generation",
    "Generation number of the policy set in force",
    registry=REGISTRY,
)
JWKS_FETCHES = Counter(
    "meshauthz_jwks_fetches",
    "JWKS and discovery fetches by issuer and result (ok, error)",
    ["issuer", "result"],
    registry=REGISTRY,
)
TOKEN_CACHE = loop_metrics.Counter(
    "meshauthz_token_cache",
    "Verified-token cache lookups by result (hit, miss)",
    ["result"],
    registry=REGISTRY,
)

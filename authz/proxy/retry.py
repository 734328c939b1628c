"""Retry decisions and back-off as Envoy's router applies them to istiod's retry policy (pure functions).

Sources: Envoy ``router_filter.rst`` (``x-envoy-retry-on``, ``x-envoy-retry-grpc-on``, "how Envoy does
retries"),
istio ``pilot/pkg/networking/core/route/retry/retry.go``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from authz.proxy.model import RetryPolicy

__all__ = ["Failure", "Outcome", "backoff", "should_retry"]

Failure = Literal["connect_failure", "reset", "timeout", "overflow"]

_GRPC_CONDITIONS = {
    "cancelled": "1",
    "deadline-exceeded": "4",
    "resource-exhausted": "8",
    "internal": "13",
    "unavailable": "14",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """One try's result: a response ``status`` (and ``grpc_status`` from its headers) or a ``failure``."""

    status: int | None = None
    failure: Failure | None = None
    grpc_status: str = ""


def should_retry(retries_done: int, outcome: Outcome, policy: RetryPolicy | None) -> bool:
    """True if ``outcome`` of the try after ``retries_done`` retries warrants another try under ``policy``."""
    if policy is None or retries_done >= policy.attempts:
        return False
    on = policy.retry_on
    failure = outcome.failure
    if failure == "overflow":  # Envoy never retries a local circuit-breaker overflow
        return False
    if failure is not None:
        if "5xx" in on or "reset" in on:  # "does not respond at all (disconnect/reset/read timeout)"
            return True
        if failure == "timeout" and "gateway-error" in on:  # a per-try timeout answers 504
            return True
        return failure == "connect_failure" and "connect-failure" in on
    status = outcome.status
    assert status is not None
    if "5xx" in on and status >= 500:
        return True
    if "gateway-error" in on and status in (502, 503, 504):
        return True
    if "retriable-4xx" in on and status == 409:
        return True
    if "retriable-status-codes" in on and status in policy.status_codes:
        return True
    if outcome.grpc_status:  # gRPC conditions look at grpc-status in the response headers only
        return any(outcome.grpc_status == code for cond, code in _GRPC_CONDITIONS.items() if cond in on)
    return False


def backoff(retry_number: int, base: float, rng: random.Random) -> float:
    """Fully jittered exponential back-off: retry N waits U[0, (2^N - 1)·base), capped at 10× base (Envoy)."""
    ceiling = min((2**retry_number - 1) * base, 10 * base)
    return rng.uniform(0.0, ceiling)

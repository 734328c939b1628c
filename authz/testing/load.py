"""A small bounded load generator: ``concurrency`` threads send numbered requests until ``requests`` were
sent, ``max_seconds`` passed or ``stop`` is set, and every request's outcome is recorded.

The caller supplies ``send(index, worker) -> (status, detail)``; ``worker`` (0..concurrency-1) lets it keep
one client per thread. Any exception raised by ``send`` is recorded as a lost request (status 0) with the
exception's type as detail: a load run never raises because one request failed.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["LOST", "LoadResult", "Outcome", "median_latency", "run_load"]

LOST = 0  # status of a request that got no HTTP response at all (reset, refused, timed out)
JOIN_GRACE = 10.0  # seconds past max_seconds to wait for a worker stuck in its last request

Send = Callable[[int, int], tuple[int, str]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: when it started (seconds since the run began), how long it took, what came back."""

    index: int
    started: float
    latency: float
    status: int
    detail: str = ""

    @property
    def finished(self) -> float:
        return self.started + self.latency


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed: float = 0.0
    stopped_by: str = "count"  # "count" | "time" | "stop"

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def lost(self) -> int:
        return sum(1 for o in self.outcomes if o.status == LOST)

    def statuses(self, outcomes: Iterable[Outcome] | None = None) -> Counter[int]:
        return Counter(o.status for o in (self.outcomes if outcomes is None else outcomes))

    def where(self, predicate: Callable[[Outcome], bool]) -> list[Outcome]:
        return [o for o in self.outcomes if predicate(o)]

    def between(self, start: float, end: float) -> list[Outcome]:
        """Requests that started in ``[start, end)`` (seconds since the run began)."""
        return [o for o in self.outcomes if start <= o.started < end]

    def in_order(self) -> list[Outcome]:
        return sorted(self.outcomes, key=lambda o: o.started)


def median_latency(outcomes: Iterable[Outcome]) -> float:
    """Median latency in seconds; ``nan`` when there are no outcomes."""
    values = [o.latency for o in outcomes]
    return statistics.median(values) if values else float("nan")


def run_load(
    send: Send,
    *,
    requests: int,
    concurrency: int,
    max_seconds: float,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> LoadResult:
    """Send up to ``requests`` requests from ``concurrency`` threads within ``max_seconds``; blocks."""
    if requests < 0 or concurrency < 1 or max_seconds <= 0:
        raise ValueError("requests >= 0, concurrency >= 1 and max_seconds > 0 are required")
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    next_index = [0]
    stopped = ["count"]
    start = clock()
    deadline = start + max_seconds

    def claim() -> int | None:
        with lock:
            if stop is not None and stop.is_set():
                stopped[0] = "stop"
                return None
            if clock() >= deadline:
                stopped[0] = "time"
                return None
            if next_index[0] >= requests:
                return None
            next_index[0] += 1
            return next_index[0] - 1

    def work(worker: int) -> None:
        for _ in range(requests + 1):  # bounded: each pass claims one index or returns
            index = claim()
            if index is None:
                return
            began = clock()
            try:
                status, detail = send(index, worker)
            except Exception as exc:  # a lost request is an outcome, not an error of the run
                status, detail = LOST, type(exc).__name__
            ended = clock()
            with lock:
                outcomes.append(Outcome(index, began - start, ended - began, status, detail))

    threads = [
        threading.Thread(target=work, args=(w,), name=f"load-{w}", daemon=True) for w in range(concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - clock()) + JOIN_GRACE)
    with lock:
        result = LoadResult(sorted(outcomes, key=lambda o: o.index), clock() - start, stopped[0])
    return result

"""The bounded load generator itself (authz/testing/load.py): bounds by count, time and stop; outcomes."""

from __future__ import annotations

import math
import threading
import time

import pytest

import authz.testing
from authz.testing.load import LOST, LoadResult, Outcome, median_latency, run_load

pytestmark = pytest.mark.reliability


def test_public_api_is_exactly_the_intended_names() -> None:
    assert sorted(authz.testing.__all__) == ["LOST", "LoadResult", "Outcome", "median_latency", "run_load"]


def test_stops_at_the_request_count_with_every_index_once() -> None:
    workers_seen: set[int] = set()

    def send(index: int, worker: int) -> tuple[int, str]:
        workers_seen.add(worker)
        time.sleep(0.001)
        return 200, str(index)

    result = run_load(send, requests=60, concurrency=4, max_seconds=30)
    assert result.stopped_by == "count"
    assert [o.index for o in result.outcomes] == list(range(60))
    assert all(o.detail == str(o.index) and o.status == 200 for o in result.outcomes)
    assert workers_seen <= {0, 1, 2, 3} and len(workers_seen) >= 2
    assert result.sent == 60 and result.lost == 0


def test_stops_at_the_time_cap() -> None:
    def send(index: int, worker: int) -> tuple[int, str]:
        time.sleep(0.01)
        return 200, ""

    started = time.monotonic()
    result = run_load(send, requests=1_000_000, concurrency=2, max_seconds=0.2)
    assert result.stopped_by == "time"
    assert 0 < result.sent < 100
    assert time.monotonic() - started < 2


def test_stops_when_told() -> None:
    stop = threading.Event()

    def send(index: int, worker: int) -> tuple[int, str]:
        if index == 20:
            stop.set()
        return 204, ""

    result = run_load(send, requests=1_000_000, concurrency=3, max_seconds=30, stop=stop)
    assert result.stopped_by == "stop"
    assert 21 <= result.sent <= 24  # index 20, plus at most one in flight per other worker


def test_exceptions_are_lost_requests_not_errors_of_the_run() -> None:
    def send(index: int, worker: int) -> tuple[int, str]:
        if index % 2:
            raise ConnectionResetError("reset")
        return 200, ""

    result = run_load(send, requests=10, concurrency=2, max_seconds=30)
    assert result.lost == 5
    assert {o.detail for o in result.outcomes if o.status == LOST} == {"ConnectionResetError"}
    assert result.statuses() == {200: 5, LOST: 5}


def test_timestamps_come_from_the_injected_clock() -> None:
    ticks = iter(range(1000))

    def clock() -> float:
        return float(next(ticks))

    result = run_load(lambda i, w: (200, ""), requests=3, concurrency=1, max_seconds=1000, clock=clock)
    assert [(o.started, o.latency) for o in result.outcomes] == [(2.0, 1.0), (5.0, 1.0), (8.0, 1.0)]
    assert result.outcomes[0].finished == 3.0


def test_selection_helpers() -> None:
    outcomes = [Outcome(i, float(i), 0.1 * (i + 1), 200 if i % 2 else 403) for i in range(5)]
    result = LoadResult(outcomes, 5.0)
    assert [o.index for o in result.between(1.0, 3.0)] == [1, 2]
    assert [o.index for o in result.where(lambda o: o.status == 403)] == [0, 2, 4]
    assert median_latency(outcomes) == pytest.approx(0.3)
    assert math.isnan(median_latency([]))
    assert [o.index for o in LoadResult(list(reversed(outcomes))).in_order()] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("requests", "concurrency", "max_seconds"), [(-1, 1, 1.0), (1, 0, 1.0), (1, 1, 0.0)])
def test_bad_bounds_are_refused(requests: int, concurrency: int, max_seconds: float) -> None:
    with pytest.raises(ValueError, match="required"):
        run_load(lambda i, w: (200, ""), requests=requests, concurrency=concurrency, max_seconds=max_seconds)

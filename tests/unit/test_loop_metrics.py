"""authz.loop_metrics exports what prometheus_client's own Counter/Histogram export for the same updates."""

from __future__ import annotations

import re

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from authz import loop_metrics

BUCKETS = (0.00005, 0.0001, 0.00025, 0.001, 0.5, 1.0)
_CREATED = re.compile(rb"^(\S+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def _exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition with the ``_created`` timestamps blanked (they differ by construction)."""
    return _CREATED.sub(rb"\1 T", generate_latest(registry))


label_values = st.sampled_from(["allow", "deny", "a b", 'q"uote', "back\\slash", "ünï"])
observations = st.floats(min_value=0, max_value=2.0, allow_nan=False) | st.sampled_from(BUCKETS)


@settings(max_examples=60, deadline=None)
@given(updates=st.lists(st.tuples(label_values, label_values, observations, st.integers(0, 3)), max_size=30))
def test_same_exposition_as_prometheus_client(updates: list[tuple[str, str, float, int]]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    their_counter = prometheus_client.Counter(
        "demo_checks", "Checks", ["decision", "reason"], registry=theirs
    )
    our_counter = loop_metrics.Counter("demo_checks", "Checks", ["decision", "reason"], registry=ours)
    their_hist = prometheus_client.Histogram(
        "demo_seconds", "Time", ["decision"], buckets=BUCKETS, registry=theirs
    )
    our_hist = loop_metrics.Histogram("demo_seconds", "Time", ["decision"], buckets=BUCKETS, registry=ours)
    their_plain = prometheus_client.Histogram("demo_plain", "Unlabelled", buckets=BUCKETS, registry=theirs)
    our_plain = loop_metrics.Histogram("demo_plain", "Unlabelled", buckets=BUCKETS, registry=ours)
    for first, second, value, amount in updates:
        their_counter.labels(decision=first, reason=second).inc(amount)
        our_counter.labels(decision=first, reason=second).inc(amount)
        their_hist.labels(first).observe(value)
        our_hist.labels(first).observe(value)
        their_plain.observe(value)
        our_plain.observe(value)
    assert _exposition(ours) == _exposition(theirs)


def test_bucket_bounds_are_upper_inclusive_and_counts_cumulative() -> None:
    registry = CollectorRegistry()
    hist = loop_metrics.Histogram("demo_seconds", "Time", buckets=(1.0, 2.0), registry=registry)
    for value in (0.5, 1.0, 1.5, 2.0, 7.0):
        hist.observe(value)
    assert registry.get_sample_value("demo_seconds_bucket", {"le": "1.0"}) == 2
    assert registry.get_sample_value("demo_seconds_bucket", {"le": "2.0"}) == 4
    assert registry.get_sample_value("demo_seconds_bucket", {"le": "+Inf"}) == 5
    assert registry.get_sample_value("demo_seconds_count") == 5
    assert registry.get_sample_value("demo_seconds_sum") == pytest.approx(12.0)


def test_unlabelled_counter_and_label_errors() -> None:
    registry = CollectorRegistry()
    plain = loop_metrics.Counter("demo_plain", "Plain", registry=registry)
    plain.inc()
    plain.inc(2)
    assert registry.get_sample_value("demo_plain_total") == 3
    labelled = loop_metrics.Counter("demo_labelled", "Labelled", ["result"], registry=registry)
    with pytest.raises(ValueError, match="has labels"):
        labelled.inc()
    with pytest.raises(ValueError, match="expected labels"):
        labelled.labels(outcome="ok")
    with pytest.raises(ValueError, match="expected 1 label values"):
        labelled.labels("ok", "extra")
    with pytest.raises(ValueError, match="non-negative"):
        labelled.labels("ok").inc(-1)
    assert labelled.labels("ok") is labelled.labels(result="ok")


def test_the_unlabelled_series_is_the_one_the_metric_updates() -> None:
    registry = CollectorRegistry()
    plain = loop_metrics.Counter("demo_series", "Plain", registry=registry)
    plain.unlabelled().inc(2)
    plain.inc()
    assert plain.unlabelled() is plain.unlabelled()
    assert registry.get_sample_value("demo_series_total") == 3
    hist = loop_metrics.Histogram("demo_series_seconds", "H", buckets=(1.0, 2.0), registry=registry)
    observe = hist.unlabelled().observe  # bound once, as the engine does
    observe(0.5)
    hist.observe(1.5)
    assert registry.get_sample_value("demo_series_seconds_count") == 2
    assert registry.get_sample_value("demo_series_seconds_bucket", {"le": "1.0"}) == 1
    labelled = loop_metrics.Histogram("demo_series_l", "L", ["x"], buckets=(1.0,), registry=registry)
    with pytest.raises(ValueError, match="has labels"):
        labelled.unlabelled()
    with pytest.raises(ValueError, match="has labels"):
        loop_metrics.Counter("demo_series_lc", "L", ["x"], registry=registry).unlabelled()


def test_buckets_must_increase() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        loop_metrics.Histogram("demo_bad", "Bad", buckets=(2.0, 1.0))


def test_duplicate_names_are_refused_by_the_registry() -> None:
    registry = CollectorRegistry()
    loop_metrics.Counter("demo_once", "Once", registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        loop_metrics.Counter("demo_once", "Again", registry=registry)

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.micro import RULES_PER_POLICY, percentile, policy_yaml, time_calls


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 50) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_is_a_member_and_monotonic(values: list[float], q: float) -> None:
    ordered = sorted(values)
    p = percentile(ordered, q)
    assert p in ordered
    assert percentile(ordered, min(100.0, q + 10)) >= p


@pytest.mark.parametrize("count", [1, 10, RULES_PER_POLICY, RULES_PER_POLICY + 1, 1000])
def test_policy_yaml_has_exactly_the_rules_asked_for(count: int) -> None:
    docs = list(yaml.safe_load_all(policy_yaml(count)))
    rules = [r for d in docs for r in d["spec"]["rules"]]
    assert len(rules) == count
    assert all(len(d["spec"]["rules"]) <= RULES_PER_POLICY for d in docs)
    assert len({d["metadata"]["name"] for d in docs}) == len(docs)
    paths = {r["to"][0]["operation"]["paths"][0] for r in rules}
    assert len(paths) == count  # every rule is different
    assert rules[-1]["to"][0]["operation"]["paths"] == [f"/api/r{count - 1}/*"]


def test_time_calls_counts_calls_within_its_bounds() -> None:
    calls: list[int] = []
    result = time_calls("noop", lambda: calls.append(1), budget_s=5.0, max_iterations=25)
    assert result["case"] == "noop"
    assert result["iterations"] == 25
    assert 25 < len(calls) <= 35  # plus at most 10 warm-up calls
    assert 0 <= result["p50_us"] <= result["p99_us"]

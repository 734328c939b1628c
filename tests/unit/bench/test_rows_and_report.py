from __future__ import annotations

import json

import pytest

from bench.measure import RunMeasurement
from bench.report import load_table, micro_table, results_document
from bench.rows import QUICK_ROWS, ROWS, RowResult, RowSpec, select_rows
from bench.wrk import WrkResult


def ids(rows: list[RowSpec]) -> list[str]:
    return [r.id for r in rows]


def test_row_ids_are_unique_and_anchors_come_first() -> None:
    seen: set[str] = set()
    for row in ROWS:
        assert row.id not in seen
        if row.anchor is not None:
            assert row.anchor in seen, f"{row.id} is measured before its anchor {row.anchor}"
        seen.add(row.id)
    assert set(QUICK_ROWS) <= seen


def test_the_anchors_of_the_brief() -> None:
    by_id = {r.id: r for r in ROWS}
    assert by_id["2a"].anchor == by_id["2b"].anchor == "1"
    assert {r.anchor for r in ROWS if r.id.startswith("3")} == {"2a"}
    assert by_id["4b"].anchor == by_id["4c"].anchor == "2b"
    assert not by_id["2a"].jwt_cache and by_id["2b"].jwt_cache


def test_row_three_covers_grpc_http_warm_cold_one_and_two_workers() -> None:
    threes = [r for r in ROWS if r.kind == "ext_authz"]
    assert {(r.mode, r.cold, r.workers) for r in threes} == {
        (m, c, w) for m in ("grpc", "http") for c in (False, True) for w in (1, 2)
    }


def test_selection_by_prefix_keeps_table_order() -> None:
    assert ids(select_rows(["3h", "1"])) == ["1", "3hw1", "3hc1", "3hw2", "3hc2"]
    assert ids(select_rows(["2a", "2a", " 2b "])) == ["2a", "2b"]
    assert len(select_rows(["3"])) == 8
    assert select_rows([]) == []


def test_unknown_selector_is_an_error() -> None:
    with pytest.raises(ValueError, match="'9'"):
        select_rows(["1", "9"])


def run(
    rps: float, *, p50: float = 1.0, non_2xx: int = 0, cpu: dict[str, float | None] | None = None
) -> RunMeasurement:
    requests = int(rps * 5)
    return RunMeasurement(WrkResult(requests, 5.0, p50, p50 * 4, 0, non_2xx), cpu or {})


SPEC = {r.id: r for r in ROWS}


def test_medians_over_runs() -> None:
    r = RowResult(SPEC["1"], "ok", runs=[run(100), run(300, p50=3.0), run(200, p50=2.0)])
    assert r.requests_per_s == pytest.approx(200)
    assert r.p50_ms == pytest.approx(2.0)
    assert r.p99_ms == pytest.approx(8.0)


def test_cpu_median_per_process_and_missing_process() -> None:
    r = RowResult(
        SPEC["1"], "ok", runs=[run(1, cpu={"envoy": 30.0, "wrk": 5.0}), run(1, cpu={"envoy": 50.0})]
    )
    assert r.cpu_us("envoy") == pytest.approx(40.0)
    assert r.cpu_us("wrk") == pytest.approx(5.0)
    assert r.cpu_us("authz") is None
    assert r.processes() == ["envoy", "wrk"]


def test_error_fraction() -> None:
    r = RowResult(SPEC["2a"], "ok", runs=[run(1000, non_2xx=50)])
    assert r.error_fraction == pytest.approx(0.01)
    assert RowResult(SPEC["2a"], "skipped", "x").error_fraction is None


def sample_results() -> list[RowResult]:
    return [
        RowResult(SPEC["1"], "ok", runs=[run(40000, cpu={"envoy": 26.0, "upstream": 20.0, "wrk": 9.0})]),
        RowResult(SPEC["2a"], "ok", runs=[run(12000, cpu={"envoy": 80.0})]),
        RowResult(SPEC["3gw1"], "ok", runs=[run(3000, cpu={"envoy": 220.0, "authz": 350.0})]),
        RowResult(SPEC["3hw1"], "skipped", "authz serve is not available: exited with code 2"),
        RowResult(SPEC["4b"], "ok", runs=[run(5000)]),  # anchor 2b not measured
    ]


def test_load_table_ratios_and_skips() -> None:
    text = load_table(sample_results(), duration_s=5, repeat=3, connections=32)
    lines = text.splitlines()
    row = {line.split()[0]: line for line in lines[2:] if line and line[0].isalnum()}
    assert row["1"].endswith("anchor")
    assert row["2a"].endswith("0.30x of 1")
    assert row["3gw1"].endswith("0.25x of 2a")
    assert row["4b"].endswith("- of 2b")  # anchor missing: no made-up ratio
    assert "3hw1" in row and "skipped: authz serve is not available" in row["3hw1"]
    assert "350" in row["3gw1"].split() and "220" in row["3gw1"].split()
    assert "Medians of 3 run(s) of 5 s" in text
    assert "noisy" in text
    header = lines[0].split()
    assert header[:4] == ["row", "setup", "req/s", "p50"]


def test_results_document_is_json_with_ratios() -> None:
    doc = results_document(sample_results(), {"policy": [{"case": "x", "skipped": "no"}]}, {"repeat": 3})
    text = json.dumps(doc)
    back = json.loads(text)
    by_id = {r["id"]: r for r in back["rows"]}
    assert by_id["1"]["ratio_to_anchor"] is None
    assert by_id["2a"]["ratio_to_anchor"] == pytest.approx(0.3)
    assert by_id["3gw1"]["median"]["cpu_us_per_request"] == {"envoy": 220.0, "authz": 350.0}
    assert by_id["3hw1"]["status"] == "skipped"
    assert by_id["3gw1"]["runs"][0]["requests"] == 15000
    assert back["meta"] == {"repeat": 3}
    assert back["micro"]["policy"][0]["skipped"] == "no"


def test_micro_table() -> None:
    text = micro_table(
        "JWT",
        [
            {"case": "RS256 cold", "p50_us": 41.2, "p99_us": 63.0, "iterations": 7000},
            {"case": "ES256", "skipped": "ImportError: nope"},
        ],
    )
    lines = text.splitlines()
    assert lines[0] == "JWT"
    assert lines[3].split() == ["RS256", "cold", "41", "63", "7000"]
    assert lines[4] == "ES256: skipped: ImportError: nope"

from __future__ import annotations

import json

import pytest

from bench.measure import RunMeasurement
from bench.report import FloorRatio, floor_line, floor_ratios, load_table, micro_table, results_document
from bench.rows import BARE_PROCESS, QUICK_ROWS, ROWS, RowResult, RowSpec, select_rows
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


def test_the_floor_rows_one_per_protocol_before_their_protocol_rows() -> None:
    bare = [r for r in ROWS if r.kind == "bare_ext_authz"]
    assert [(r.id, r.mode, r.reads_headers) for r in bare] == [
        ("3gb", "grpc", False),
        ("3hb", "http", False),
        ("3ht", "http", True),
    ]
    for r in bare:
        assert not r.auth and not r.cold and r.workers == 1 and r.anchor == "2a"
        protocol_rows = [x.id for x in ROWS if x.kind == "ext_authz" and x.mode == r.mode]
        order = [x.id for x in ROWS]
        assert all(order.index(r.id) < order.index(x) for x in protocol_rows)
    assert {"3gb", "3hb", "3gw1", "3hw1"} <= set(QUICK_ROWS)


def test_selection_by_prefix_keeps_table_order() -> None:
    assert ids(select_rows(["3h", "1"])) == ["1", "3hb", "3ht", "3hw1", "3hc1", "3hw2", "3hc2", "3hp1"]
    assert ids(select_rows(["2a", "2a", " 2b "])) == ["2a", "2b"]
    assert len(select_rows(["3"])) == 13  # 3gb, 3g{w,c}{1,2}, 3gi1 (grpc.aio), 3hb, 3ht, 3h{w,c}{1,2}, 3hp1
    assert ids(select_rows(["3hw1", "3gb", "3hb", "3gw1"])) == ["3gb", "3gw1", "3hb", "3hw1"]
    assert ids(select_rows(["3gb"])) == ["3gb"]
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


def floor_results() -> list[RowResult]:
    return [
        RowResult(SPEC["3gb"], "ok", runs=[run(5000, cpu={"envoy": 90.0, BARE_PROCESS: 100.0})]),
        RowResult(SPEC["3gw1"], "ok", runs=[run(3000, cpu={"envoy": 95.0, "authz": 150.0})]),
        RowResult(SPEC["3gc1"], "ok", runs=[run(900, cpu={"authz": 900.0})]),
        RowResult(
            SPEC["3hb"], "ok", runs=[run(6000, cpu={BARE_PROCESS: 40.0}), run(6000, cpu={BARE_PROCESS: 60.0})]
        ),
        RowResult(SPEC["3hw1"], "ok", runs=[run(4000, cpu={"authz": 110.0})]),
        RowResult(SPEC["3hw2"], "failed", "10% errors", runs=[run(4000, cpu={"authz": 1.0})]),
    ]


def test_floor_ratio_is_authz_cpu_over_the_bare_cpu_of_the_same_protocol() -> None:
    ratios = {f.row: f for f in floor_ratios(floor_results())}
    assert set(ratios) == {"3gw1", "3gc1", "3hw1"}  # failed rows and the floors themselves get none
    assert ratios["3gw1"] == FloorRatio("3gw1", "3gb", 150.0, 100.0)
    assert ratios["3gw1"].ratio == pytest.approx(1.5)
    assert ratios["3gc1"].ratio == pytest.approx(9.0)
    assert ratios["3hw1"].floor == "3hb"
    assert ratios["3hw1"].ratio == pytest.approx(110.0 / 50.0)  # the floor's median over its runs


def test_no_floor_no_ratio() -> None:
    results = floor_results()
    without_http_floor = [r for r in results if r.spec.id != "3hb"]
    assert [f.row for f in floor_ratios(without_http_floor)] == ["3gw1", "3gc1"]
    floor_failed = [
        RowResult(SPEC["3gb"], "failed", "x", r.runs) if r.spec.id == "3gb" else r for r in results
    ]
    assert [f.row for f in floor_ratios(floor_failed)] == ["3hw1"]
    zero_cpu = [RowResult(SPEC["3gb"], "ok", runs=[run(10, cpu={BARE_PROCESS: 0.0})]), results[1]]
    assert floor_ratios(zero_cpu) == []
    no_authz_cpu = [results[0], RowResult(SPEC["3gw1"], "ok", runs=[run(10, cpu={"envoy": 1.0})])]
    assert floor_ratios(no_authz_cpu) == []


def test_floor_line_says_the_target_sentence() -> None:
    line = floor_line(FloorRatio("3hw1", "3hb", 138.2, 60.0))
    assert line == "3hw1: authz CPU per check vs the bare floor of its protocol (3hb): 2.30x (138 us / 60 us)"
    assert "1.00x (9.5 us / 9.5 us)" in floor_line(FloorRatio("3gw1", "3gb", 9.5, 9.5))


def test_load_table_shows_the_floor_cpu_in_the_authz_column_and_the_ratios_under_it() -> None:
    text = load_table(floor_results(), duration_s=5, repeat=1, connections=32)
    lines = text.splitlines()
    header = lines[0]
    authz_col = header.index("authz us") + len("authz us")  # right-aligned: cells end where the header ends
    closing_rule = lines.index(lines[1], 2)
    row = {line.split()[0]: line for line in lines[2:closing_rule]}
    assert row["3gb"][:authz_col].endswith(" 100")
    assert row["3hb"][:authz_col].endswith(" 50")
    assert row["3gw1"][:authz_col].endswith(" 150")
    notes = lines[closing_rule + 1 :]
    ratio_lines = [n for n in notes if "bare floor of its protocol" in n]
    assert ratio_lines == [
        "3gw1: authz CPU per check vs the bare floor of its protocol (3gb): 1.50x (150 us / 100 us)",
        "3gc1: authz CPU per check vs the bare floor of its protocol (3gb): 9.00x (900 us / 100 us)",
        "3hw1: authz CPU per check vs the bare floor of its protocol (3hb): 2.20x (110 us / 50 us)",
    ]
    assert any("1.5x" in n for n in notes)
    # Without floor rows: no ratio lines at all.
    plain = load_table(sample_results(), duration_s=5, repeat=1, connections=32)
    assert "bare floor" not in plain


def test_results_document_carries_the_floor_ratio() -> None:
    back = json.loads(json.dumps(results_document(floor_results(), {}, {})))
    by_id = {r["id"]: r for r in back["rows"]}
    assert by_id["3gw1"]["cpu_vs_floor"] == {
        "floor": "3gb",
        "authz_us": 150.0,
        "floor_us": 100.0,
        "ratio": 1.5,
    }
    assert by_id["3gb"]["cpu_vs_floor"] is None
    assert by_id["3hw2"]["cpu_vs_floor"] is None
    assert by_id["3gb"]["median"]["cpu_us_per_request"] == {"envoy": 90.0, BARE_PROCESS: 100.0}


def test_the_header_reading_floor_is_a_second_http_reference_not_the_floor() -> None:
    """3ht never replaces 3hb in the floor ratio; it gets its own line for the HTTP rows."""
    from bench.report import header_floor_ratios

    results = [*floor_results(), RowResult(SPEC["3ht"], "ok", runs=[run(5000, cpu={BARE_PROCESS: 55.0})])]
    assert {f.row: f.floor for f in floor_ratios(results)}["3hw1"] == "3hb"
    assert [(f.row, f.floor, f.ratio) for f in header_floor_ratios(results)] == [("3hw1", "3ht", 2.0)]
    assert header_floor_ratios(floor_results()) == []  # not measured: no line
    text = load_table(results, duration_s=5, repeat=1, connections=32)
    assert (
        "3hw1: authz CPU per check vs the bare server that reads headers (3ht): 2.00x (110 us / 55 us)"
        in text
    )


def test_proxy_rows_are_set_against_the_bare_proxy_with_the_same_authorization() -> None:
    """4a against 4p (no auth), 4b against 4pe (the engine in-process); cold 4c and failed floors get none."""
    from bench.report import proxy_floor_ratios

    results = [
        RowResult(SPEC["4p"], "ok", runs=[run(9000, cpu={"proxy": 20.0})]),
        RowResult(SPEC["4pe"], "ok", runs=[run(8000, cpu={"proxy": 25.0})]),
        RowResult(SPEC["4a"], "ok", runs=[run(6000, cpu={"proxy": 30.0})]),
        RowResult(SPEC["4b"], "ok", runs=[run(5000, cpu={"proxy": 50.0})]),
        RowResult(SPEC["4c"], "ok", runs=[run(900, cpu={"proxy": 150.0})]),
    ]
    assert [(f.row, f.floor, f.ratio) for f in proxy_floor_ratios(results)] == [
        ("4a", "4p", 1.5),
        ("4b", "4pe", 2.0),
    ]
    text = load_table(results, duration_s=5, repeat=1, connections=32)
    assert "4b: proxy CPU per request vs the bare forwarding proxy (4pe): 2.00x (50 us / 25 us)" in text
    failed_floor = [RowResult(SPEC["4pe"], "failed", "down"), *results[2:]]
    assert [f.row for f in proxy_floor_ratios(failed_floor)] == []  # 4p absent, 4pe failed

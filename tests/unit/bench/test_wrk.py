from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.wrk import RESULT_MARKER, lua_script, parse_duration_text, parse_wrk_output, wrk_command

# Captured from wrk 4.1.0 (Debian) against a server answering 404: the text fallback must read it.
WRK_TEXT = """\
Running 1s test @ http://127.0.0.1:18777/nonexistent
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.15ms    2.75ms  20.86ms   83.79%
    Req/Sec     1.45k   397.23     2.12k    60.00%
  Latency Distribution
     50%    2.11ms
     75%    4.33ms
     90%    6.95ms
     99%   12.85ms
  1443 requests in 1.00s, 732.77KB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 1443
Requests/sec:   1442.45
Transfer/sec:    732.49KB
"""

MARKER_LINE = (
    'BENCH_RESULT {"requests":50000,"duration_us":5000000,"p50_us":830,"p99_us":4100,'
    '"connect":0,"read":1,"write":0,"status":7,"timeout":2}'
)


def test_text_output_is_parsed_field_by_field() -> None:
    r = parse_wrk_output(WRK_TEXT)
    assert r.requests == 1443
    assert r.duration_s == pytest.approx(1.0)
    assert r.p50_ms == pytest.approx(2.11)
    assert r.p99_ms == pytest.approx(12.85)
    assert r.socket_errors == 10
    assert r.non_2xx == 1443
    assert r.ok_requests == 0
    assert r.requests_per_s == pytest.approx(1443.0)


def test_marker_line_wins_over_text_and_converts_units() -> None:
    r = parse_wrk_output(WRK_TEXT + MARKER_LINE + "\n")
    assert r.requests == 50000
    assert r.duration_s == pytest.approx(5.0)
    assert r.requests_per_s == pytest.approx(10000.0)
    assert r.p50_ms == pytest.approx(0.83)
    assert r.p99_ms == pytest.approx(4.1)
    assert r.socket_errors == 3
    assert r.non_2xx == 7


def test_text_without_errors_or_percentiles_defaults_to_zero_and_none() -> None:
    text = "  10 requests in 2.00s, 1.00KB read\nRequests/sec: 5.00\n"
    r = parse_wrk_output(text)
    assert (r.requests, r.socket_errors, r.non_2xx, r.p50_ms, r.p99_ms) == (10, 0, 0, None, None)
    assert r.requests_per_s == pytest.approx(5.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unable to connect to 127.0.0.1:1 Connection refused",
        RESULT_MARKER + "[1, 2]",
        RESULT_MARKER + '{"requests": 1}',
        RESULT_MARKER + "{not json",
    ],
)
def test_unusable_output_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_wrk_output(text)


def test_zero_duration_gives_zero_rate_not_a_crash() -> None:
    r = parse_wrk_output(MARKER_LINE.replace('"duration_us":5000000', '"duration_us":0'))
    assert r.requests_per_s == 0.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("812.00us", 812e-6), ("1.23ms", 1.23e-3), ("5.00s", 5.0), ("1.50m", 90.0), ("2h", 7200.0)],
)
def test_duration_units(text: str, seconds: float) -> None:
    assert parse_duration_text(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 s", "1.2.3ms", "-1ms", "1ns"])
def test_bad_durations_raise(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration_text(text)


@settings(max_examples=50, deadline=None)
@given(
    st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from(["us", "ms", "s", "m", "h"]),
)
def test_duration_round_trips_wrk_formatting(value: float, unit: str) -> None:
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    text = f"{value:.2f}{unit}"
    assert parse_duration_text(text) == pytest.approx(float(f"{value:.2f}") * scale)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_raises_anything_but_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_wrk_output(text)


def test_static_script_defines_no_request_function() -> None:
    # wrk reuses one pre-built request only when the script has no `request` (script_is_static).
    static = lua_script(rotate_tokens=False)
    assert "done = function" in static
    assert "request = function" not in static
    rotating = lua_script(rotate_tokens=True)
    assert "request = function" in rotating
    assert "io.lines(args[1])" in rotating
    assert "BENCH_RESULT" in rotating
    paths = lua_script(rotate_tokens=False, new_paths=True)
    assert "request = function" in paths and 'wrk.path .. "/" .. counter' in paths
    assert "io.lines" not in paths and "BENCH_RESULT" in paths
    with pytest.raises(ValueError, match="not both"):
        lua_script(rotate_tokens=True, new_paths=True)


def test_command_shape() -> None:
    argv = wrk_command(
        "http://127.0.0.1:8080/api/items",
        duration_s=0.4,
        connections=32,
        threads=1,
        script="/tmp/s.lua",
        headers={"Authorization": "Bearer t"},
        script_args=("/tmp/tokens.txt",),
    )
    assert argv[:3] == ["wrk", "-t1", "-c32"]
    assert "-d1s" in argv  # wrk takes whole seconds; never 0
    assert argv[argv.index("-H") + 1] == "Authorization: Bearer t"
    assert argv[-3:] == ["http://127.0.0.1:8080/api/items", "--", "/tmp/tokens.txt"]


def test_connections_never_below_threads() -> None:
    argv = wrk_command("http://127.0.0.1:1/", duration_s=5, connections=1, threads=4, script="s.lua")
    assert "-c4" in argv
    assert "-d5s" in argv


@pytest.mark.parametrize("url", ["http://10.0.0.1:80/", "http://example.com/", "https://127.0.0.1:443/"])
def test_only_loopback_targets(url: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        wrk_command(url, duration_s=1, connections=1, threads=1, script="s.lua")

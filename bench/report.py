"""The printed tables and the JSON document, built from row results. Pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.rows import RowResult
from bench.table import fmt_ms, fmt_rate, fmt_ratio, fmt_us, ratio, render_table

__all__ = ["CPU_COLUMNS", "load_table", "micro_table", "results_document"]

# Processes whose CPU gets a column, in this order; a row without that process shows "-".
CPU_COLUMNS = ("envoy", "authz", "proxy", "upstream", "wrk")


def _anchor_rates(results: Sequence[RowResult]) -> dict[str, float | None]:
    return {r.spec.id: r.requests_per_s for r in results if r.status == "ok"}


def load_table(results: Sequence[RowResult], *, duration_s: float, repeat: int, connections: int) -> str:
    """The side-by-side table: throughput, latency, CPU µs/request per process, ratio to the anchor."""
    headers = [
        "row",
        "setup",
        "req/s",
        "p50 ms",
        "p99 ms",
        "err %",
        *(f"{name} us" for name in CPU_COLUMNS),
        "vs anchor",
    ]
    anchors = _anchor_rates(results)
    rows: list[list[str]] = []
    for r in results:
        if r.status != "ok":
            rows.append([f"{r.spec.id:<5} {r.spec.title}: {r.status}: {r.reason}"])
            continue
        errors = r.error_fraction
        anchor = r.spec.anchor
        vs = fmt_ratio(ratio(r.requests_per_s, anchors.get(anchor))) + f" of {anchor}" if anchor else "anchor"
        rows.append(
            [
                r.spec.id,
                r.spec.title,
                fmt_rate(r.requests_per_s),
                fmt_ms(r.p50_ms),
                fmt_ms(r.p99_ms),
                "-" if errors is None else f"{errors * 100:.1f}",
                *(fmt_us(r.cpu_us(name)) for name in CPU_COLUMNS),
                vs,
            ]
        )
    notes = [
        f"Medians of {repeat} run(s) of {duration_s:g} s each after a warm-up; wrk -c{connections}, loopback,"
        " Envoy --concurrency 1.",
        "This 2-core machine is shared and noisy: compare ratios and CPU us/request, not absolute req/s.",
        "<process> us = CPU us per request: utime+stime delta of its process tree (/proc/<pid>/stat,",
        "  children included) / requests; upstream = the direct_response Envoy, wrk = the load generator.",
        "vs anchor = req/s / the anchor row's req/s (1 for 2a, 2b, 4a; 2a for rows 3; 2b for 4b, 4c).",
    ]
    return render_table(headers, rows, right_align=range(2, len(headers) - 1), notes=notes)


def micro_table(title: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """In-process micro benchmarks; each row is ``{case, p50_us, p99_us, iterations}`` or
    ``{case, skipped}``."""
    out: list[list[str]] = []
    for row in rows:
        if row.get("skipped"):
            out.append([f"{row['case']}: skipped: {row['skipped']}"])
        else:
            out.append(
                [
                    str(row["case"]),
                    fmt_us(row.get("p50_us")),
                    fmt_us(row.get("p99_us")),
                    str(row["iterations"]),
                ]
            )
    return title + "\n" + render_table(["case", "p50 us", "p99 us", "iterations"], out, right_align=(1, 2, 3))


def results_document(
    results: Sequence[RowResult], micro: Mapping[str, Any], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """What ``bench/results/latest.json`` holds: run metadata, every row (runs and medians), micro results."""
    anchors = _anchor_rates(results)
    rows = []
    for r in results:
        doc = r.to_json()
        doc["ratio_to_anchor"] = (
            ratio(r.requests_per_s, anchors.get(r.spec.anchor)) if r.spec.anchor else None
        )
        rows.append(doc)
    return {"meta": dict(meta), "rows": rows, "micro": dict(micro)}

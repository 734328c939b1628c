"""The printed tables and the JSON document, built from row results. Pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.rows import BARE_PROCESS, RowResult
from bench.table import fmt_ms, fmt_rate, fmt_ratio, fmt_us, ratio, render_table

__all__ = [
    "CPU_COLUMNS",
    "FloorRatio",
    "floor_line",
    "floor_ratios",
    "header_floor_ratios",
    "load_table",
    "micro_table",
    "proxy_floor_ratios",
    "results_document",
]

# Processes whose CPU gets a column, in this order; a row without that process shows "-".
CPU_COLUMNS = ("envoy", "authz", "proxy", "upstream", "wrk")
# Other processes shown in a column: the bare check server of rows 3gb/3hb sits where authz serve does.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {"authz": (BARE_PROCESS,)}


@dataclass(frozen=True)
class FloorRatio:
    """An ext_authz row's authorizer CPU per check over the bare check server's, same protocol, same run."""

    row: str
    floor: str
    authz_us: float
    floor_us: float

    @property
    def ratio(self) -> float:
        return self.authz_us / self.floor_us


def floor_ratios(results: Sequence[RowResult], *, reading_headers: bool = False) -> list[FloorRatio]:
    """For every measured ext_authz row (3g*, 3h*) whose protocol's floor row (3gb, 3hb; with
    ``reading_headers`` 3ht, the bare server that reads every header and keeps a token cache) was measured
    in the same run: ``authz us / bare us`` (median CPU µs per request of each). Rows or floors that are
    not ``ok``, or lack a CPU number, are left out rather than given a made-up ratio."""
    floors = {
        r.spec.mode: r
        for r in results
        if r.status == "ok" and r.spec.kind == "bare_ext_authz" and r.spec.reads_headers == reading_headers
    }
    out: list[FloorRatio] = []
    for r in results:
        if r.status != "ok" or r.spec.kind != "ext_authz" or r.spec.mode not in floors:
            continue
        floor = floors[r.spec.mode]
        authz_us, floor_us = r.cpu_us("authz"), floor.cpu_us(BARE_PROCESS)
        if authz_us is None or floor_us is None or floor_us <= 0:
            continue
        out.append(FloorRatio(r.spec.id, floor.spec.id, authz_us, floor_us))
    return out


def header_floor_ratios(results: Sequence[RowResult]) -> list[FloorRatio]:
    """:func:`floor_ratios` against row 3ht (HTTP rows only: there is no header-reading gRPC floor)."""
    return floor_ratios(results, reading_headers=True)


def proxy_floor_ratios(results: Sequence[RowResult]) -> list[FloorRatio]:
    """For the bundled proxy's warm rows (4a, 4b): its CPU per request over the bare forwarding proxy's
    with the same authorization (4p without, 4pe with the engine in-process), same run: what the proxy's
    own data path costs beyond parsing, forwarding and deciding."""
    floors = {r.spec.auth: r for r in results if r.status == "ok" and r.spec.kind == "bare_proxy"}
    out: list[FloorRatio] = []
    for r in results:
        if r.status != "ok" or r.spec.kind != "proxy" or r.spec.cold or r.spec.auth not in floors:
            continue
        floor = floors[r.spec.auth]
        proxy_us, floor_us = r.cpu_us("proxy"), floor.cpu_us("proxy")
        if proxy_us is None or floor_us is None or floor_us <= 0:
            continue
        out.append(FloorRatio(r.spec.id, floor.spec.id, proxy_us, floor_us))
    return out


def floor_line(f: FloorRatio) -> str:
    """``3hw1: authz CPU per check vs the bare floor of its protocol (3hb): 2.31x (138 us / 60 us)``."""
    return (
        f"{f.row}: authz CPU per check vs the bare floor of its protocol ({f.floor}): {f.ratio:.2f}x "
        f"({fmt_us(f.authz_us)} us / {fmt_us(f.floor_us)} us)"
    )


def _column_cpu(r: RowResult, column: str) -> float | None:
    for process in (column, *COLUMN_ALIASES.get(column, ())):
        value = r.cpu_us(process)
        if value is not None:
            return value
    return None


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
                *(fmt_us(_column_cpu(r, name)) for name in CPU_COLUMNS),
                vs,
            ]
        )
    notes = [
        f"Medians of {repeat} run(s) of {duration_s:g} s each after a warm-up; wrk -c{connections}, loopback,"
        " Envoy --concurrency 1.",
        "This 2-core machine is shared and noisy: compare ratios and CPU us/request, not absolute req/s.",
        "<process> us = CPU us per request: utime+stime delta of its process tree (/proc/<pid>/stat,",
        "  children included) / requests; upstream = the direct_response Envoy, wrk = the load generator.",
        "  In rows 3gb/3hb the authz column is the bare check server (allows all): the protocol's floor.",
        "vs anchor = req/s / the anchor row's req/s (1 for 2a, 2b, 4a; 2a for rows 3; 2b for 4b, 4c).",
    ]
    ratios = floor_ratios(results)
    if ratios:
        notes.append("Target: warm 1-worker rows within 1.5x of the floor (authz us / bare us, this run):")
        notes.extend(floor_line(f) for f in ratios)
    for f in header_floor_ratios(results):
        notes.append(
            f"{f.row}: authz CPU per check vs the bare server that reads headers ({f.floor}): {f.ratio:.2f}x "
            f"({fmt_us(f.authz_us)} us / {fmt_us(f.floor_us)} us)"
        )
    for f in proxy_floor_ratios(results):
        notes.append(
            f"{f.row}: proxy CPU per request vs the bare forwarding proxy ({f.floor}): {f.ratio:.2f}x "
            f"({fmt_us(f.authz_us)} us / {fmt_us(f.floor_us)} us)"
        )
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
    floors = {f.row: f for f in floor_ratios(results)}
    rows = []
    for r in results:
        doc = r.to_json()
        doc["ratio_to_anchor"] = (
            ratio(r.requests_per_s, anchors.get(r.spec.anchor)) if r.spec.anchor else None
        )
        floor = floors.get(r.spec.id)
        doc["cpu_vs_floor"] = (
            None
            if floor is None
            else {
                "floor": floor.floor,
                "authz_us": floor.authz_us,
                "floor_us": floor.floor_us,
                "ratio": floor.ratio,
            }
        )
        rows.append(doc)
    return {"meta": dict(meta), "rows": rows, "micro": dict(micro)}

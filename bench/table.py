"""Plain-text tables and the numbers in them (medians, ratios, formatting). Pure functions only."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = [
    "fmt_ms",
    "fmt_rate",
    "fmt_ratio",
    "fmt_us",
    "median_or_none",
    "ratio",
    "render_table",
]

DASH = "-"


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the values that are present; ``None`` when none is."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, anchor: float | None) -> float | None:
    """``value / anchor``, or ``None`` when either is missing or the anchor is zero."""
    if value is None or anchor is None or anchor <= 0:
        return None
    return value / anchor


def fmt_rate(value: float | None) -> str:
    """Requests per second: thousands separated, no decimals (``12,345``)."""
    return DASH if value is None else f"{value:,.0f}"


def fmt_ms(value: float | None) -> str:
    """Milliseconds with 2 decimals below 100 ms, 1 above (``0.83``, ``123.4``)."""
    if value is None:
        return DASH
    return f"{value:.2f}" if value < 100 else f"{value:.1f}"


def fmt_us(value: float | None) -> str:
    """Microseconds: 1 decimal below 10 µs, whole numbers above (``0.4``, ``352``)."""
    if value is None:
        return DASH
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    """A ratio as ``0.42x``."""
    return DASH if value is None else f"{value:.2f}x"


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right_align: Sequence[int] = (),
    notes: Sequence[str] = (),
) -> str:
    """Columns padded to their widest cell, separated by two spaces, a dashed rule under the header.

    Columns in ``right_align`` (indexes) are right-aligned (numbers); the others left-aligned. A row
    with a single cell is a full-width line (used for "skipped: reason"). ``notes`` are printed under
    a closing rule. Trailing spaces are stripped from every line.
    """
    width = len(headers)
    for row in rows:
        if len(row) not in (1, width):
            raise ValueError(f"row has {len(row)} cells, expected {width} (or 1): {row!r}")
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) == width:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
    right = set(right_align)

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    total = sum(widths) + 2 * (width - 1)
    out = [line(headers), "-" * total]
    for row in rows:
        out.append(line(row) if len(row) == width else row[0].rstrip())
    if notes:
        out.append("-" * total)
        out.extend(n.rstrip() for n in notes)
    return "\n".join(out)

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.table import fmt_ms, fmt_rate, fmt_ratio, fmt_us, median_or_none, ratio, render_table


def test_columns_align_and_numbers_are_right_aligned() -> None:
    text = render_table(["row", "req/s"], [["1", "12,345"], ["2a", "9"]], right_align=[1])
    assert text.splitlines() == [
        "row   req/s",
        "-----------",
        "1    12,345",
        "2a        9",
    ]


def test_single_cell_rows_span_and_notes_follow_a_rule() -> None:
    text = render_table(["a", "b"], [["x", "y"], ["3g: skipped: no server"]], notes=["medians of 3 runs"])
    lines = text.splitlines()
    assert lines[3] == "3g: skipped: no server"
    assert lines[4] == "-" * len(lines[1])
    assert lines[5] == "medians of 3 runs"
    # A long single-cell row does not widen the columns.
    assert lines[0] == "a  b"


def test_wrong_cell_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected 3"):
        render_table(["a", "b", "c"], [["1", "2"]])


def test_no_trailing_spaces() -> None:
    text = render_table(["name", "v"], [["a", ""], ["long name", "1"]])
    assert all(line == line.rstrip() for line in text.splitlines())


cell = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda n: st.tuples(
            st.lists(cell, min_size=n, max_size=n),
            st.lists(st.lists(cell, min_size=n, max_size=n), max_size=6),
        )
    )
)
def test_every_column_starts_at_the_same_offset(table: tuple[list[str], list[list[str]]]) -> None:
    headers, rows = table
    lines = render_table(headers, rows).splitlines()
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for line, cells in zip([lines[0], *lines[2:]], [headers, *rows], strict=True):
        offset = 0
        for i, c in enumerate(cells):
            assert line[offset : offset + len(c)] == c
            offset += widths[i] + 2


def test_formatters() -> None:
    assert fmt_rate(12345.6) == "12,346"
    assert fmt_ms(0.834) == "0.83"
    assert fmt_ms(123.45) == "123.5"
    assert fmt_us(0.44) == "0.4"
    assert fmt_us(1352.2) == "1,352"
    assert fmt_ratio(0.4249) == "0.42x"
    assert [f(None) for f in (fmt_rate, fmt_ms, fmt_us, fmt_ratio)] == ["-"] * 4


def test_median_ignores_missing_values() -> None:
    assert median_or_none([3.0, None, 1.0, 2.0]) == 2.0
    assert median_or_none([None, None]) is None
    assert median_or_none([]) is None


def test_ratio() -> None:
    assert ratio(3000.0, 12000.0) == pytest.approx(0.25)
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None

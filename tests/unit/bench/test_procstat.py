from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.procstat import (
    ProcStat,
    cpu_us_per_request,
    descendants,
    parse_stat,
    read_stat,
    snapshot,
    sum_trees,
    tree_cpu_ticks,
)


def stat_line(
    pid: int, comm: str, ppid: int, utime: int, stime: int, *, cutime: int = 0, cstime: int = 0
) -> str:
    # Fields 1..17 then a few more, as in proc(5): pid (comm) state ppid pgrp session tty tpgid flags
    # minflt cminflt majflt cmajflt utime stime cutime cstime priority nice ...
    return (
        f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 "
        f"{utime} {stime} {cutime} {cstime} 20 0 1 0 12345 1000000 100"
    )


def test_parse_reads_times_and_parent() -> None:
    s = parse_stat(stat_line(42, "envoy", 1, 120, 30, cutime=5, cstime=2))
    assert (s.pid, s.comm, s.state, s.ppid) == (42, "envoy", "S", 1)
    assert (s.utime, s.stime, s.cutime, s.cstime) == (120, 30, 5, 2)
    assert s.own_ticks == 150
    assert s.total_ticks == 157


def test_comm_with_spaces_and_parentheses() -> None:
    s = parse_stat(stat_line(7, "we ird) (name", 3, 11, 22))
    assert s.comm == "we ird) (name"
    assert (s.ppid, s.utime, s.stime) == (3, 11, 22)


@pytest.mark.parametrize("text", ["", "42 envoy S 1", "42 (envoy) S 1 2 3", "x (a) S 1" + " 0" * 20])
def test_malformed_lines_raise(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stat(text)


@settings(max_examples=50, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_characters="\n\x00"), max_size=15),
    st.integers(0, 2**31),
    st.integers(0, 2**31),
)
def test_any_comm_round_trips(comm: str, utime: int, stime: int) -> None:
    s = parse_stat(stat_line(99, comm, 1, utime, stime))
    assert (s.comm, s.utime, s.stime) == (comm, utime, stime)


def _stats(*items: tuple[int, int, int]) -> dict[int, ProcStat]:
    return {pid: ProcStat(pid, "p", "S", ppid, ticks, 0, 0, 0) for pid, ppid, ticks in items}


def test_tree_includes_grandchildren_not_siblings() -> None:
    # 10 -> 11 -> 12; 10 -> 13; 20 is unrelated; 1 is init.
    stats = _stats((1, 0, 1000), (10, 1, 5), (11, 10, 7), (12, 11, 11), (13, 10, 13), (20, 1, 17))
    assert descendants(10, stats) == {10, 11, 12, 13}
    assert tree_cpu_ticks(10, stats) == 5 + 7 + 11 + 13
    assert tree_cpu_ticks(11, stats) == 7 + 11
    assert tree_cpu_ticks(999, stats) == 0  # gone
    assert sum_trees([10, 11, 20], stats) == 5 + 7 + 11 + 13 + 17  # overlap counted once


def test_waited_for_children_count_toward_the_parent() -> None:
    stats = {5: ProcStat(5, "authz", "S", 1, 100, 50, 30, 20)}
    assert tree_cpu_ticks(5, stats) == 200


def test_ppid_cycle_terminates() -> None:
    stats = _stats((2, 3, 1), (3, 2, 1))
    assert descendants(2, stats) == {2, 3}


def test_cpu_per_request() -> None:
    # 250 ticks at 100 Hz = 2.5 s of CPU over 100k requests = 25 us each.
    assert cpu_us_per_request(1000, 1250, 100_000, ticks_per_s=100) == pytest.approx(25.0)
    assert cpu_us_per_request(0, 10, 0, ticks_per_s=100) is None
    assert cpu_us_per_request(50, 40, 10, ticks_per_s=100) == 0.0  # a restarted pid never goes negative


def test_read_stat_and_snapshot_on_a_fake_proc(tmp_path: Path) -> None:
    for pid, line in ((1, stat_line(1, "init", 0, 1, 1)), (77, stat_line(77, "wrk", 1, 300, 40))):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(line + "\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "88").mkdir()  # vanished between listing and reading: no stat file
    assert read_stat(77, tmp_path) == parse_stat(stat_line(77, "wrk", 1, 300, 40))
    assert read_stat(88, tmp_path) is None
    assert sorted(snapshot(tmp_path)) == [1, 77]


def test_reads_this_process() -> None:
    import os

    me = read_stat(os.getpid())
    assert me is not None
    assert me.pid == os.getpid()
    assert me.state in ("R", "S", "D")

"""CPU accounting from ``/proc/<pid>/stat`` (proc(5)): utime + stime of a process tree, in clock ticks.

The tree of a root pid is the root and every live descendant; each member contributes its own
``utime + stime`` plus ``cutime + cstime`` (children it has already waited for), so work done by a worker
that exited and was reaped during the run is still counted. Parsing and tree arithmetic are pure; only
:func:`read_stat` and :func:`snapshot` touch ``/proc``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CLOCK_TICKS_PER_S",
    "ProcStat",
    "cpu_us_per_request",
    "descendants",
    "parse_stat",
    "read_stat",
    "snapshot",
    "sum_trees",
    "tree_cpu_ticks",
]

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PROC_ROOT = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` we use (proc(5) fields 1-4 and 14-17, times in ticks)."""

    pid: int
    comm: str
    state: str
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def own_ticks(self) -> int:
        return self.utime + self.stime

    @property
    def total_ticks(self) -> int:
        """Own time plus waited-for children's time (cutime/cstime are never negative in practice)."""
        return self.utime + self.stime + max(0, self.cutime) + max(0, self.cstime)


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/<pid>/stat`` line.

    proc(5): field 2 is ``(comm)``, which may itself contain spaces and parentheses, so the fields after
    it start at the *last* ``)``. Raises ``ValueError`` on a malformed line.
    """
    open_at = text.find("(")
    close_at = text.rfind(")")
    if open_at < 0 or close_at < open_at:
        raise ValueError("no (comm) in stat line")
    pid = int(text[:open_at].strip())
    comm = text[open_at + 1 : close_at]
    rest = text[close_at + 1 :].split()
    # rest[0] is field 3 (state); field n is rest[n - 3].
    if len(rest) < 15:
        raise ValueError(f"stat line has {len(rest) + 2} fields, need at least 17")
    return ProcStat(
        pid=pid,
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        cutime=int(rest[13]),
        cstime=int(rest[14]),
    )


def read_stat(pid: int, proc_root: Path = PROC_ROOT) -> ProcStat | None:
    """The stat of ``pid``, or ``None`` if it is gone (a zombie still has one, with its final times)."""
    try:
        return parse_stat((proc_root / str(pid) / "stat").read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None


def snapshot(proc_root: Path = PROC_ROOT) -> dict[int, ProcStat]:
    """Every process's stat, by pid. Processes that vanish while we read are skipped."""
    out: dict[int, ProcStat] = {}
    for entry in proc_root.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name), proc_root)
            if stat is not None:
                out[stat.pid] = stat
    return out


def descendants(root: int, stats: Mapping[int, ProcStat]) -> set[int]:
    """``root`` and all its descendants present in ``stats`` (by ``ppid`` links)."""
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found: set[int] = set()
    stack = [root] if root in stats else []
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


def tree_cpu_ticks(root: int, stats: Mapping[int, ProcStat]) -> int:
    """CPU ticks of the tree rooted at ``root`` (0 if ``root`` is not in ``stats``)."""
    return sum(stats[pid].total_ticks for pid in descendants(root, stats))


def cpu_us_per_request(
    ticks_before: int, ticks_after: int, requests: int, ticks_per_s: int = CLOCK_TICKS_PER_S
) -> float | None:
    """Microseconds of CPU per request between two readings; ``None`` without requests."""
    if requests <= 0:
        return None
    return max(0, ticks_after - ticks_before) * 1e6 / ticks_per_s / requests


def sum_trees(roots: Iterable[int], stats: Mapping[int, ProcStat]) -> int:
    """Ticks of several trees, each process counted once even if trees overlap."""
    pids: set[int] = set()
    for root in roots:
        pids |= descendants(root, stats)
    return sum(stats[pid].total_ticks for pid in pids)

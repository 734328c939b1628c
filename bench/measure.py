"""One measured load run: wrk against a target, with the CPU of every tracked process tree around it.

CPU is read from ``/proc/<pid>/stat`` just before wrk starts and right after it exits. wrk's own CPU is
read from its zombie: we wait for the ``Z`` state *before* reaping it, so ``/proc/<pid>/stat`` still holds
its final utime + stime (proc(5)).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from bench import procstat
from bench.processes import ProcessSet
from bench.wrk import WrkResult, parse_wrk_output

__all__ = ["LOAD_GENERATOR", "RunMeasurement", "run_measured", "run_quiet"]

LOAD_GENERATOR = "wrk"
EXIT_GRACE_S = 15.0  # wrk stops itself at -d; this bounds a wedged run


@dataclass(frozen=True)
class RunMeasurement:
    result: WrkResult
    cpu_us_per_request: Mapping[str, float | None] = field(default_factory=dict)


def _wait_zombie(pid: int, deadline: float) -> procstat.ProcStat | None:
    """Poll until ``pid`` is a zombie (exited, not yet reaped); its stat then holds the final CPU times."""
    while time.monotonic() < deadline:
        stat = procstat.read_stat(pid)
        if stat is None or stat.state in ("Z", "X"):
            return stat
        time.sleep(0.02)
    return None


def run_measured(
    procs: ProcessSet,
    argv: list[str],
    *,
    duration_s: float,
    tracked: Mapping[str, int],
    name: str = LOAD_GENERATOR,
) -> RunMeasurement:
    """Run the load generator ``argv`` to completion; CPU µs per request for each ``tracked`` tree
    (name -> root pid) and for the load generator itself. Raises ``RuntimeError`` if it fails."""
    before = procstat.snapshot()
    ticks_before = {n: procstat.tree_cpu_ticks(pid, before) for n, pid in tracked.items()}
    proc = procs.start(name, argv)
    final = _wait_zombie(proc.pid, time.monotonic() + duration_s + EXIT_GRACE_S)
    after = procstat.snapshot()
    if final is None:
        procs.stop(proc)
        raise RuntimeError(f"{name} did not finish within {duration_s + EXIT_GRACE_S:.0f}s")
    code = proc.popen.wait(timeout=EXIT_GRACE_S)
    procs.processes.remove(proc)  # reaped: its pid may be reused, never signal it again
    output = proc.log_tail(chars=1 << 16)
    if code != 0:
        raise RuntimeError(f"{name} exited with code {code}: {output[-300:]}")
    try:
        result = parse_wrk_output(output)
    except ValueError as exc:
        raise RuntimeError(f"cannot parse {name} output ({exc}): {output[-300:]}") from exc
    cpu: dict[str, float | None] = {
        n: procstat.cpu_us_per_request(ticks_before[n], procstat.tree_cpu_ticks(pid, after), result.requests)
        for n, pid in tracked.items()
    }
    cpu[name] = procstat.cpu_us_per_request(0, final.total_ticks, result.requests)
    return RunMeasurement(result, cpu)


def run_quiet(argv: list[str], *, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    """A short helper command (``--version``), bounded in time; output captured."""
    return subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)

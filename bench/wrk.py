"""wrk: the command line, the Lua scripts we hand it, and parsing of what it prints.

Pure functions only (no processes): :mod:`bench.runner` starts wrk and feeds the output here.
wrk 4.1 (Debian ``wrk``) calls a script's ``done(summary, latency, requests)`` once at the end
(wrk ``SCRIPTING`` file); our ``done`` prints one machine-readable ``BENCH_RESULT {json}`` line, and the
human text wrk prints itself (``--latency``) is the fallback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = [
    "RESULT_MARKER",
    "WrkResult",
    "lua_script",
    "parse_duration_text",
    "parse_wrk_output",
    "wrk_command",
]

RESULT_MARKER = "BENCH_RESULT "

# One ``done`` for every script: wrk reports latency in microseconds; summary.errors.status counts
# responses with a status above 399 (wrk src/wrk.c ``response_complete``).
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,'
    .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

# Rotates through one token per line of the file given as the script argument. A cycle longer than an
# LRU cache always misses it, so 20k tokens keep a 10k-entry token cache cold (every request verifies).
_ROTATE = """
local tokens = {}
local count = 0
local next_index = 0
init = function(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      count = count + 1
      tokens[count] = line
    end
  end
  if count == 0 then error("no tokens in " .. args[1]) end
end
request = function()
  next_index = next_index % count + 1
  local headers = {}
  for k, v in pairs(wrk.headers) do headers[k] = v end
  headers["Authorization"] = "Bearer " .. tokens[next_index]
  return wrk.format(nil, nil, headers)
end
"""


# A new path under the URL's for every request (``/api/items/1``, ``/api/items/2``, ...), the same headers
# (the -H token): no two checks are alike, so nothing an authorizer remembers per request ever repeats.
_NEW_PATHS = """
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, wrk.path .. "/" .. counter)
end
"""


def lua_script(*, rotate_tokens: bool, new_paths: bool = False) -> str:
    """The Lua script text: ``done`` always; a token-rotating ``request`` when ``rotate_tokens``, one that
    asks a new path each time when ``new_paths`` (not both).

    wrk pre-builds one request and reuses it unless the script defines ``request`` (wrk src/script.c
    ``script_is_static``), so the warm script defines none: warm rows pay no Lua per request.
    """
    if rotate_tokens and new_paths:
        raise ValueError("one request function per script: rotate tokens or paths, not both")
    return (_ROTATE if rotate_tokens else _NEW_PATHS if new_paths else "") + _DONE


def wrk_command(
    url: str,
    *,
    duration_s: float,
    connections: int,
    threads: int,
    script: str,
    headers: dict[str, str] | None = None,
    script_args: tuple[str, ...] = (),
    timeout_s: float = 5.0,
    binary: str = "wrk",
) -> list[str]:
    """argv for one wrk run. wrk takes whole seconds for ``-d``; anything below 1 s becomes 1 s."""
    if not url.startswith(("http://127.0.0.1:", "http://[::1]:")):
        raise ValueError(f"bench targets loopback only, not {url!r}")
    argv = [
        binary,
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "--latency",
        "-s",
        script,
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]
    return argv


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run. Latencies in milliseconds; ``non_2xx`` counts responses with status >= 400."""

    requests: int
    duration_s: float
    p50_ms: float | None
    p99_ms: float | None
    socket_errors: int
    non_2xx: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ok_requests(self) -> int:
        return max(0, self.requests - self.non_2xx)


_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)\s*$")


def parse_duration_text(text: str) -> float:
    """wrk's duration text (``812.00us``, ``1.23ms``, ``5.00s``, ``1.50m``) in seconds.

    wrk src/units.c ``format_time_us`` picks the unit; raises ``ValueError`` on anything else.
    """
    m = _DURATION_RE.match(text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_S[m.group(2)]


_SUMMARY_RE = re.compile(r"^\s*(\d+) requests in ([0-9.]+(?:us|ms|s|m|h)),", re.MULTILINE)
_PERCENTILE_RE = re.compile(r"^\s*(50|99)(?:\.000)?%\s+([0-9.]+(?:us|ms|s|m|h))\s*$", re.MULTILINE)
_NON_2XX_RE = re.compile(r"^\s*Non-2xx or 3xx responses:\s*(\d+)", re.MULTILINE)
_SOCKET_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE)


def _parse_marker(line: str) -> WrkResult:
    data = json.loads(line[len(RESULT_MARKER) :])
    if not isinstance(data, dict):
        raise ValueError("BENCH_RESULT is not a JSON object")
    keys = ("requests", "duration_us", "p50_us", "p99_us", "connect", "read", "write", "status", "timeout")
    missing = [k for k in keys if not isinstance(data.get(k), int)]
    if missing:
        raise ValueError(f"BENCH_RESULT lacks integer fields: {', '.join(missing)}")
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        non_2xx=data["status"],
    )


def _parse_text(text: str) -> WrkResult:
    summary = _SUMMARY_RE.search(text)
    if summary is None:
        raise ValueError("wrk output has no 'N requests in T' summary line")
    percentiles = {m.group(1): parse_duration_text(m.group(2)) * 1e3 for m in _PERCENTILE_RE.finditer(text)}
    non_2xx = _NON_2XX_RE.search(text)
    sockets = _SOCKET_RE.search(text)
    return WrkResult(
        requests=int(summary.group(1)),
        duration_s=parse_duration_text(summary.group(2)),
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        socket_errors=sum(int(g) for g in sockets.groups()) if sockets else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def parse_wrk_output(text: str) -> WrkResult:
    """Parse a wrk run's stdout: the ``BENCH_RESULT`` line when present (exact percentiles in µs),
    else wrk's own ``--latency`` text. Raises ``ValueError`` when neither is there."""
    for line in text.splitlines():
        if line.startswith(RESULT_MARKER):
            return _parse_marker(line.strip())
    return _parse_text(text)

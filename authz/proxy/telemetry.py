"""Request ids, trace-context propagation and the access log line (pure functions; random ids).

* ``x-request-id``: kept when the client sent one, else a random UUID-shaped id (spec §3.6: ``uuid4`` is
  the slow way; a seeded generator is cheaper still than ``os.urandom``, which is a system call).
* W3C Trace Context ``traceparent`` (https://www.w3.org/TR/trace-context/ §3.2): keep the trace id, new
  parent (span) id; start a trace when absent or malformed. B3 (``x-b3-*``) is propagated with a child span.
* Envoy response flags (NR, UF, UO, URX, UT, DC, FI, DI, UC, UH, UAEX) in the access log and metrics.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping

__all__ = ["access_log_line", "child_trace_headers", "request_id"]

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


# Ids need to be unique, not secret (Envoy draws its UUIDs from a non-cryptographic generator too): a
# Mersenne Twister seeded from the OS costs no system call per request, unlike ``os.urandom``.
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))  # workers must not share a sequence


def request_id(existing: str | None) -> str:
    """The client's id when it is sane (printable, at most 128 chars), else a random UUID-shaped one."""
    if existing and len(existing) <= 128 and existing.isprintable():
        return existing
    h = _ids.randbytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


def child_trace_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Trace headers to send upstream: a child of the incoming span, or a new trace (sampled flag kept)."""
    out: list[tuple[str, str]] = []
    span = f"{_ids.getrandbits(64):016x}"
    m = _TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
    if m and m.group(1) != "ff" and set(m.group(2)) != {"0"} and set(m.group(3)) != {"0"}:
        out.append(("traceparent", f"00-{m.group(2)}-{span}-{m.group(4)}"))
        if "tracestate" in headers:
            out.append(("tracestate", headers["tracestate"]))
    else:
        out.append(("traceparent", f"00-{_ids.getrandbits(128):032x}-{span}-01"))
    b3_trace = headers.get("x-b3-traceid")
    if b3_trace and re.fullmatch(r"[0-9a-f]{16}|[0-9a-f]{32}", b3_trace):
        out.append(("x-b3-traceid", b3_trace))
        out.append(("x-b3-spanid", span))
        parent = headers.get("x-b3-spanid")
        if parent:
            out.append(("x-b3-parentspanid", parent))
        if "x-b3-sampled" in headers:
            out.append(("x-b3-sampled", headers["x-b3-sampled"]))
    return out


TRACE_HEADERS = frozenset(
    {"traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled"}
)


def access_log_line(fields: Mapping[str, object]) -> str:
    """One JSON access-log line in Envoy's default field order (flags ``-`` when none)."""
    return json.dumps(fields, separators=(",", ":"), default=str)

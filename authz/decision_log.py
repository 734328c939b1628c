"""The decision log: one JSON line per check, written off the hot path by a background thread."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from typing import IO, Any

from authz.decision import Decision
from authz.request import Request, Workload

__all__ = ["DecisionLog", "decision_record"]

# A burst larger than this between two flushes is dropped (and counted) rather than grow memory unbounded.
DEFAULT_MAX_PENDING = 100_000
DEFAULT_FLUSH_INTERVAL = 0.2  # seconds; a log line is at most this late


def decision_record(
    decision: Decision, request: Request, workload: Workload, *, now: float, latency_s: float
) -> dict[str, Any]:
    http = request.http
    return {
        "time": now,
        "decision_id": decision.decision_id,
        "workload": {"namespace": workload.namespace, "labels": dict(workload.labels)},
        "principal": decision.principal,
        "request_principal": decision.request_principal,
        "source_ip": request.source.address,
        "remote_ip": request.remote_ip,
        "method": http.method if http else "",
        "host": http.host if http else "",
        "path": decision.normalized_path,
        "decision": "allow" if decision.allowed else "deny",
        "status": decision.status,
        "reason": decision.reason,
        "policy": decision.policy_id,
        "shadow": (
            None
            if decision.shadow is None
            else {"allowed": decision.shadow.allowed, "policy": decision.shadow.policy_id}
        ),
        "audit": decision.audit,
        "latency_us": round(latency_s * 1e6, 1),
    }


class DecisionLog:
    """Collects records in memory; a daemon thread serializes and writes them in batches."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._pending: deque[dict[str, Any]] = deque()
        self._max_pending = max_pending
        self._flush_interval = flush_interval
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def record(self, record: dict[str, Any]) -> None:
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        self._pending.append(record)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_interval):
            self.flush()
        self.flush()

    def flush(self) -> None:
        lines = []
        pending = self._pending
        while pending:
            lines.append(json.dumps(pending.popleft(), separators=(",", ":")))
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                self.dropped += len(lines)

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        time.sleep(0)

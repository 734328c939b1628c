"""Subprocesses of a bench run: each in its own process group, all killed at the end, whatever happens.

:class:`ProcessSet` is a context manager; leaving it (normally, on an exception or on Ctrl-C) sends
SIGTERM to every group it started, waits a bounded time, then SIGKILLs what is left. Every wait here is
bounded in time. Only loopback addresses are ever probed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "ManagedProcess",
    "ProcessSet",
    "StartupError",
    "free_port",
    "http_get",
    "parse_listening_line",
    "wait_envoy",
    "wait_http_ok",
    "wait_listening",
]

STOP_GRACE_S = 3.0  # SIGTERM -> SIGKILL; Envoy and the authorizer exit in well under a second
POLL_INTERVAL_S = 0.05
LOG_TAIL_CHARS = 600


class StartupError(RuntimeError):
    """A process did not come up; the message says why (with the tail of its log)."""


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-chars:].strip()

    def exit_reason(self) -> str:
        """One line for a skip message: the last non-empty log line, else the exit code."""
        lines = [ln.strip() for ln in self.log_tail().splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        code = self.popen.poll()
        return f"{self.name} exited with code {code}" + (f": {last}" if last else "")


class ProcessSet:
    """Starts processes and guarantees they are stopped when the ``with`` block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> ManagedProcess:
        """Start ``argv`` in a new session (its own process group), stdout+stderr to a log file."""
        log_path = self.log_dir / f"{name}.{len(self.processes)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        proc = ManagedProcess(name, popen, log_path)
        self.processes.append(proc)
        return proc

    def stop(self, proc: ManagedProcess) -> None:
        """SIGTERM the process group, wait up to ``STOP_GRACE_S``, then SIGKILL it."""
        if proc in self.processes:
            self.processes.remove(proc)
        _signal_group(proc.popen, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=STOP_GRACE_S)
        # Workers of a multi-process server may outlive their parent: always sweep the group.
        _signal_group(proc.popen, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=STOP_GRACE_S)

    def stop_all(self) -> None:
        for proc in reversed(list(self.processes)):
            self.stop(proc)


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child a session and group leader: its pgid is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def free_port() -> int:
    """A currently free loopback TCP port, for programs that cannot report a port-0 bind back to us.

    There is a window between closing this socket and the program binding the port; on a bench
    machine nothing else races for it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(
    port: int, path: str, *, headers: dict[str, str] | None = None, timeout_s: float = 2.0
) -> tuple[int, bytes]:
    """One GET to ``127.0.0.1:port``; returns (status, body). Raises ``OSError`` on connection failure."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from exc
    finally:
        conn.close()


def wait_http_ok(
    proc: ManagedProcess, port: int, path: str, *, timeout_s: float, headers: dict[str, str] | None = None
) -> None:
    """Poll ``GET path`` until it answers 200, the process dies, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartupError(proc.exit_reason())
        try:
            status, body = http_get(port, path, headers=headers, timeout_s=1.0)
            if status == 200:
                return
            last = f"HTTP {status} {body[:120]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(POLL_INTERVAL_S * 4)
    raise StartupError(f"{proc.name} not ready on 127.0.0.1:{port}{path} after {timeout_s:.0f}s ({last})")


def _listener_ports(admin_port: int) -> dict[str, int]:
    status, body = http_get(admin_port, "/listeners?format=json")
    if status != 200:
        raise OSError(f"admin /listeners answered {status}")
    data: Any = json.loads(body)
    out: dict[str, int] = {}
    for item in data.get("listener_statuses", []):
        addr = item.get("local_address", {}).get("socket_address", {})
        if isinstance(addr.get("port_value"), int):
            out[item.get("name", "")] = addr["port_value"]
    return out


def wait_envoy(proc: ManagedProcess, admin_address_path: Path, listener: str, *, timeout_s: float) -> int:
    """Wait for Envoy's admin address file, ``/ready`` == LIVE and the listener's bound port; return it.

    The bootstraps bind listener and admin on port 0; Envoy writes the admin address to
    ``--admin-address-path`` and reports the listener's real port at ``/listeners?format=json``.
    """
    deadline = time.monotonic() + timeout_s
    last = "admin address file not written"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartupError(proc.exit_reason())
        try:
            text = admin_address_path.read_text(encoding="utf-8").strip()
        except OSError:
            text = ""
        if text:
            try:
                admin_port = int(text.rsplit(":", 1)[1])
                status, body = http_get(admin_port, "/ready", timeout_s=1.0)
                if status == 200 and body.strip() == b"LIVE":
                    port = _listener_ports(admin_port).get(listener)
                    if port:
                        return port
                    last = f"listener {listener!r} not bound yet"
                else:
                    last = f"/ready answered {status} {body[:40]!r}"
            except (OSError, ValueError, IndexError) as exc:
                last = str(exc)
        time.sleep(POLL_INTERVAL_S)
    raise StartupError(f"{proc.name} not ready after {timeout_s:.0f}s ({last})")


# What the bare check servers (bench/bare_*_check.py) print once their socket is bound.
_LISTENING = re.compile(r"^listening on 127\.0\.0\.1:(\d{1,5})\b", re.MULTILINE)


def parse_listening_line(text: str) -> int | None:
    """The port of the first ``listening on 127.0.0.1:<port>`` line in ``text``, else ``None``."""
    match = _LISTENING.search(text)
    if match is None:
        return None
    port = int(match.group(1))
    return port if 0 < port < 65536 else None


def wait_listening(proc: ManagedProcess, *, timeout_s: float) -> int:
    """Wait until ``proc`` logs its ``listening on 127.0.0.1:<port>`` line; return the port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            head = proc.log_path.read_text(encoding="utf-8", errors="replace")[:4096]
        except OSError:
            head = ""
        port = parse_listening_line(head)
        if port is not None:
            return port
        if not proc.alive():
            raise StartupError(proc.exit_reason())
        time.sleep(POLL_INTERVAL_S)
    raise StartupError(f"{proc.name} did not report its port after {timeout_s:.0f}s")

"""Child processes of the local mesh: each in its own process group, stopped with SIGTERM and, after a
bound, SIGKILL; every wait is bounded and says what it is waiting for.

A child runs in a new session (``setsid``), so a Ctrl-C in the terminal reaches only ``authz run``, which
then stops the children in reverse start order; on Linux each child also gets ``PR_SET_PDEATHSIG``
(prctl(2)) so that it is terminated even if ``authz run`` itself is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from authz.errors import DependencyError

__all__ = [
    "DEFAULT_READY_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "Child",
    "ChildSpec",
    "Supervisor",
    "port_in_use",
    "run_quiet",
    "tail",
]

DEFAULT_READY_TIMEOUT = 30.0  # seconds: Envoy and uvicorn are up in ~1 s; a cold 2-core VM may take ~10
DEFAULT_STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL; every child here stops in < 1 s
READY_POLL_INTERVAL = 0.1
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_in_use(host: str, port: int) -> bool:
    """True if ``host:port`` cannot be bound right now (someone listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file (what to show when a child fails)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class ChildSpec:
    """One process of the mesh: ``ready_url`` answers 200 once it serves (``""``: started is ready)."""

    name: str
    argv: tuple[str, ...]
    ready_url: str = ""
    description: str = ""
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Starts children (logs in ``log_dir``), waits for readiness, stops them all. Not thread-safe."""

    def __init__(
        self,
        log_dir: Path,
        *,
        say: Callable[[str], None] = print,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self.log_dir = log_dir
        self.say = say
        self.stop_timeout = stop_timeout
        self.children: list[Child] = []

    def start(self, spec: ChildSpec) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        log = log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(spec.env)}
        try:
            process = subprocess.Popen(
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
                env=env,
            )
        except OSError as exc:
            log.close()
            raise DependencyError(f"cannot start {spec.name} ({spec.argv[0]}): {exc.strerror}") from exc
        child = Child(spec, process, log_path, log)
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, *, timeout: float = DEFAULT_READY_TIMEOUT) -> float:
        """Poll ``ready_url`` until 200; raise :class:`DependencyError` (with the log tail) if the child
        exits or ``timeout`` passes. Returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        last = "no answer yet"
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                code = child.process.poll()
                if code is not None:
                    raise DependencyError(
                        f"{child.spec.name} exited with code {code} while starting; its log "
                        f"({child.log_path}) ends with:\n{tail(child.log_path)}",
                        reason="child_exited",
                    )
                if not child.spec.ready_url:
                    return time.monotonic() - started
                try:
                    reply = client.get(child.spec.ready_url)
                    if reply.status_code == 200:
                        return time.monotonic() - started
                    last = f"HTTP {reply.status_code}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                if time.monotonic() >= deadline:
                    raise DependencyError(
                        f"{child.spec.name} was not ready after {timeout:.0f}s "
                        f"({child.spec.ready_url}: {last}); "
                        f"its log ({child.log_path}) ends with:\n{tail(child.log_path)}",
                        reason="child_not_ready",
                    )
                time.sleep(READY_POLL_INTERVAL)

    def exited(self) -> list[Child]:
        """Children that are no longer running."""
        return [c for c in self.children if c.process.poll() is not None]

    def stop_all(self) -> list[str]:
        """SIGTERM every child's process group (reverse start order), SIGKILL the groups still alive after
        ``stop_timeout``. Returns the names that needed SIGKILL."""
        for child in reversed(self.children):
            self._signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for child in reversed(self.children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        killed = []
        for child in reversed(self.children):
            if child.process.poll() is None:
                killed.append(child.spec.name)
                self.say(f"  {child.spec.name} did not stop within {self.stop_timeout:.0f}s: SIGKILL")
            # The group may hold grandchildren (``serve --workers``) even after the leader exited.
            self._signal_group(child, signal.SIGKILL)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=self.stop_timeout)
            child.log.close()
        self.children.clear()
        return killed

    @staticmethod
    def _signal_group(child: Child, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signum)


def run_quiet(argv: Sequence[str], *, timeout: float, what: str) -> str:
    """Run a short command (``authz ca``, ``authz envoy-config``); its output, or DependencyError naming
    ``what`` with the command's own message."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DependencyError(f"{what}: no answer after {timeout:.0f}s ({' '.join(argv)})") from exc
    except OSError as exc:
        raise DependencyError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from exc
    if done.returncode != 0:
        raise DependencyError(f"{what} failed:\n{(done.stderr or done.stdout).strip()}")
    return done.stdout

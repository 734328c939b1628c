"""Config reload without dropping connections, bad files rejected with file:line:field; the CLI; and the
remote gRPC ext_authz client."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz.cli import build_parser
from authz.errors import DependencyError
from authz.proxy.authz_client import GrpcAuthorizer
from authz.proxy.cli import main as proxy_main
from authz.proxy.cli import register, reload_from
from authz.proxy.loader import load_sidecar_config
from authz.proxy.sidecar import Sidecar
from authz.request import HttpAttributes, Peer, Request, Workload
from tests.integration.proxy_upstream import Action, Recorded, Upstream, service_entry

pytestmark = pytest.mark.integration


def write_config(path: Path, port_a: int, port_b: int, target: str) -> None:
    path.write_text(
        """apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {name: p, namespace: default}
spec:
  outbound: {port: 0}
  accessLog: false
---
"""
        + service_entry("a.example.com", [port_a])
        + "---\n"
        + service_entry("b.example.com", [port_b])
        + f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: front, namespace: default}}
spec:
  hosts: [front.example.com]
  http:
  - route: [{{destination: {{host: {target}}}}}]
"""
    )


def tag(name: str):  # type: ignore[no-untyped-def]
    def behaviour(rec: Recorded) -> Action:
        return Action(200, body=name.encode())

    return behaviour


async def test_reload_switches_routes_keeps_connections_and_rejects_bad_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = await Upstream(tag("a")).start()
    b = await Upstream(tag("b")).start()
    cfg = tmp_path / "proxy.yaml"
    write_config(cfg, a.port, b.port, "a.example.com")
    sidecar = Sidecar(load_sidecar_config(cfg))
    await sidecar.start()
    try:
        assert sidecar.outbound is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sidecar.outbound.port}") as c:
            assert (await c.get("/", headers={"host": "front.example.com"})).text == "a"
            write_config(cfg, a.port, b.port, "b.example.com")
            assert reload_from(sidecar, cfg)
            # same client connection, new generation
            assert (await c.get("/", headers={"host": "front.example.com"})).text == "b"
            cfg.write_text(cfg.read_text().replace("route: [", "timeout: never\n    route: ["))
            with caplog.at_level(logging.ERROR, logger="authz.proxy"):
                assert not reload_from(sidecar, cfg)
            assert "proxy.yaml:" in caplog.text and "spec.http[0].timeout" in caplog.text
            assert (await c.get("/", headers={"host": "front.example.com"})).text == "b"  # old config kept
        assert sidecar.metrics.reloads.labels("error")._value.get() == 1
    finally:
        await sidecar.stop()
        await a.close()
        await b.close()


def test_cli_registers_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    cfg = tmp_path / "p.yaml"
    write_config(cfg, 1, 2, "a.example.com")
    assert proxy_main(parser.parse_args(["proxy", "--config", str(cfg), "--check"])) == 0
    cfg.write_text(cfg.read_text().replace("resolution: STATIC", "resolution: MAGIC"))
    assert proxy_main(parser.parse_args(["proxy", "--config", str(cfg), "--check"])) == 2
    err = capsys.readouterr().err
    assert "p.yaml:" in err and "spec.resolution" in err
    assert build_parser() is not None


class _Servicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[external_auth_pb2.CheckRequest] = []

    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        resp = external_auth_pb2.CheckResponse()
        if request.attributes.request.http.path == "/deny":
            resp.status.code = 7
            resp.denied_response.status.code = 403
            h = resp.denied_response.headers.add()
            h.header.key, h.header.value = "x-authz-decision-id", "remote-1"
        else:
            h = resp.ok_response.headers.add()
            h.header.key, h.header.value = "x-user", "alice"
            h.append_action = 2
        return resp


async def test_grpc_authorizer_round_trip_and_fail_closed() -> None:
    server = grpc.aio.server()
    servicer = _Servicer()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GrpcAuthorizer(f"127.0.0.1:{port}", timeout=2.0)
    try:
        req = Request(
            source=Peer(
                "10.0.0.1", 1234, "spiffe://cluster.local/ns/a/sa/b", "-----BEGIN CERTIFICATE-----\nx\n"
            ),
            http=HttpAttributes(method="GET", host="svc", path="/ok", headers={"x-a": "1"}),
        )
        allow = await client.check(req, Workload("shop", {"app": "web", "v": "1"}))
        assert allow.allowed and allow.headers.set == (("x-user", "alice"),)
        sent = servicer.requests[0].attributes
        assert sent.source.principal == "spiffe://cluster.local/ns/a/sa/b"
        assert sent.source.certificate.startswith("-----BEGIN%20CERTIFICATE-----")
        assert dict(sent.context_extensions) == {"namespace": "shop", "labels": "app=web,v=1"}
        deny = await client.check(Request(http=HttpAttributes(path="/deny")), Workload())
        assert (deny.allowed, deny.status, deny.decision_id) == (False, 403, "remote-1")
    finally:
        await client.close()
        await server.stop(None)
    dead = GrpcAuthorizer(f"127.0.0.1:{port}", timeout=0.3)
    try:
        with pytest.raises(DependencyError):
            await dead.check(Request(http=HttpAttributes()), Workload())
    finally:
        await dead.close()
    await asyncio.sleep(0)

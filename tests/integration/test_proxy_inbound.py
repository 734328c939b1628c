"""The inbound listener's Envoy-HCM semantics end to end: path normalization before authorization and
forwarding, ``portLevelMtls`` for the workload port, and ``x-forwarded-client-cert`` handling (inbound
set per mTLS peer, outbound stripped)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authz.decision import Decision, Reason
from authz.identity.ca import create_ca, issue_svid, write_svid
from authz.proxy.sidecar import Sidecar
from authz.request import Request, Workload
from tests.integration.proxy_upstream import Upstream, echo, raw_exchange, service_entry, sidecar_config

pytestmark = pytest.mark.integration

TD = "cluster.local"


class RecordingAuthorizer:
    """Denies paths under /admin; records the path of every request it sees."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def check(self, request: Request, workload: Workload) -> Decision:
        assert request.http is not None
        self.paths.append(request.http.path)
        if request.http.path.startswith("/admin"):
            return Decision(allowed=False, status=403, reason=Reason.DENIED_BY_POLICY, message="denied")
        return Decision(allowed=True, status=200, reason=Reason.ALLOWED_BY_POLICY)


def inbound_config(app_port: int, *, extra: str = "", spec: str = "") -> str:
    return f"""
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: web, namespace: shop}}
spec:
  workload: {{namespace: shop, serviceAccount: web, labels: {{app: web}}}}
  inbound: {{port: 0, appPort: {app_port}}}
  outbound: {{port: 0}}
  accessLog: false
{spec}{extra}"""


@pytest.fixture
async def app() -> AsyncIterator[Upstream]:
    upstream = await Upstream(echo).start()
    yield upstream
    await upstream.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def get(path: str, *extra: str) -> bytes:
    return (
        "\r\n".join([f"GET {path} HTTP/1.1", "Host: web.shop", *extra, "Connection: close"]) + "\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("mode", "target", "status", "seen"),
    [
        ("BASE", "/public/../admin/x", 403, "/admin/x"),  # no bypass of the /admin deny with dot segments
        ("BASE", "/%61dmin/x", 403, "/admin/x"),
        ("BASE", "/public/%2e%2e/admin", 403, "/admin"),
        ("BASE", "/public/./a/../b?q=/../admin", 200, "/public/b?q=/../admin"),
        ("BASE", "//admin", 200, "//admin"),  # BASE keeps "//" (Istio's default; MERGE_SLASHES merges)
        ("MERGE_SLASHES", "//admin", 403, "/admin"),
        ("BASE", "/public%2F..%2Fadmin", 200, "/public%2F..%2Fadmin"),
        ("DECODE_AND_MERGE_SLASHES", "/public%2F..%2Fadmin", 403, "/admin"),
        ("NONE", "/public/../admin", 200, "/public/../admin"),
    ],
)
async def test_inbound_normalizes_before_authorizing_and_forwards_that_path(
    app: Upstream, mode: str, target: str, status: int, seen: str
) -> None:
    authorizer = RecordingAuthorizer()
    config = inbound_config(app.port, spec=f"  pathNormalization: {{normalization: {mode}}}\n")
    sidecar = Sidecar(sidecar_config(config), authorizer=authorizer)  # type: ignore[arg-type]
    await sidecar.start()
    assert sidecar.inbound is not None
    try:
        raw = await raw_exchange(sidecar.inbound.port, get(target))
    finally:
        await sidecar.stop()
    assert status_of(raw) == status
    assert authorizer.paths == [seen]
    if status == 200:
        assert [r.target for r in app.requests] == [seen]
    else:
        assert app.requests == []


@pytest.mark.parametrize("target", ["/a%00b", "/public#frag", "/public/..%00/admin"])
async def test_inbound_rejects_nul_and_fragments_before_the_authorizer(app: Upstream, target: str) -> None:
    authorizer = RecordingAuthorizer()
    sidecar = Sidecar(sidecar_config(inbound_config(app.port)), authorizer=authorizer)  # type: ignore[arg-type]
    await sidecar.start()
    assert sidecar.inbound is not None
    try:
        raw = await raw_exchange(sidecar.inbound.port, get(target))
    finally:
        await sidecar.stop()
    assert status_of(raw) == 400
    assert authorizer.paths == []
    assert app.requests == []


async def test_outbound_strips_a_client_sent_xfcc_and_routes_the_normalized_path(app: Upstream) -> None:
    vs = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [db.example.com]
  http:
  - match: [{uri: {prefix: /admin}}]
    route: [{destination: {host: db.example.com}}]
    headers: {request: {set: {x-route: admin}}}
  - route: [{destination: {host: db.example.com}}]
"""
    config = inbound_config(0, extra="---\n" + vs + "---\n" + service_entry("db.example.com", [app.port]))
    sidecar = Sidecar(sidecar_config(config))  # type: ignore[arg-type]
    await sidecar.start()
    assert sidecar.outbound is not None
    try:
        raw = await raw_exchange(
            sidecar.outbound.port,
            b"GET /x/../admin HTTP/1.1\r\nHost: db.example.com\r\n"
            b"X-Forwarded-Client-Cert: By=spiffe://forged\r\nConnection: close\r\n\r\n",
        )
    finally:
        await sidecar.stop()
    assert status_of(raw) == 200
    (rec,) = app.requests
    assert rec.target == "/admin"
    assert rec.headers.get("x-route") == "admin"
    assert "x-forwarded-client-cert" not in rec.headers


# -- portLevelMtls ---------------------------------------------------------------------------------------


def peer_authentications(port: int, port_mode: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  portLevelMtls:
    {port}: {{mode: {port_mode}}}
"""


@pytest.mark.parametrize(
    ("entry_for_app_port", "port_mode", "plaintext_served"),
    [
        (True, "PERMISSIVE", True),
        (True, "DISABLE", True),
        (True, "UNSET", False),  # inherits the mesh's STRICT
        (False, "DISABLE", False),  # an entry for another port leaves the app port STRICT
    ],
)
async def test_port_level_mtls_applies_to_the_workload_port(
    app: Upstream, tmp_path: Path, entry_for_app_port: bool, port_mode: str, plaintext_served: bool
) -> None:
    write_svid(issue_svid(create_ca(TD), f"spiffe://{TD}/ns/shop/sa/web"), tmp_path)
    port = app.port if entry_for_app_port else app.port + 1
    config = inbound_config(
        app.port,
        spec=f"  identity: {{certDir: {tmp_path}}}\n",
        extra="---\n" + peer_authentications(port, port_mode),
    )
    sidecar = Sidecar(sidecar_config(config))  # type: ignore[arg-type]
    await sidecar.start()
    assert sidecar.inbound is not None
    try:
        raw = await raw_exchange(sidecar.inbound.port, get("/hello"))
    finally:
        await sidecar.stop()
    if plaintext_served:
        assert status_of(raw) == 200
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["target"] == "/hello"
    else:
        assert raw == b""  # STRICT: the plaintext request is not served
        assert app.requests == []


class DecidesNowOrWaits(RecordingAuthorizer):
    """An in-process authorizer: answers /now/* without waiting (check_now), everything else by check."""

    def __init__(self) -> None:
        super().__init__()
        self.now: list[str] = []

    def check_now(self, request: Request, workload: Workload) -> Decision | None:
        assert request.http is not None
        if not request.http.path.startswith("/now/"):
            return None  # would wait: the proxy awaits check() instead
        self.now.append(request.http.path)
        allowed = request.http.path != "/now/deny"
        return Decision(
            allowed=allowed, status=200 if allowed else 403, reason=Reason.ALLOWED_BY_POLICY, message="now"
        )


async def test_inbound_uses_the_authorizers_immediate_answer_and_awaits_it_otherwise(app: Upstream) -> None:
    authorizer = DecidesNowOrWaits()
    sidecar = Sidecar(sidecar_config(inbound_config(app.port)), authorizer=authorizer)  # type: ignore[arg-type]
    await sidecar.start()
    assert sidecar.inbound is not None
    try:
        statuses = [
            status_of(await raw_exchange(sidecar.inbound.port, get(path)))
            for path in ("/now/a", "/now/deny", "/later", "/admin/x")
        ]
    finally:
        await sidecar.stop()
    assert statuses == [200, 403, 200, 403]
    assert authorizer.now == ["/now/a", "/now/deny"]  # decided at once: check() never ran for them
    assert authorizer.paths == ["/later", "/admin/x"]  # check_now said it would wait: check() decided
    assert [r.target for r in app.requests] == ["/now/a", "/later"]

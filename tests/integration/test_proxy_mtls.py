"""mTLS between two sidecars on SPIFFE SVIDs, PeerAuthentication modes, and inbound authorization."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from authz.decision import Decision, HeaderOps, Reason
from authz.errors import DependencyError
from authz.identity.ca import create_ca, issue_svid, write_svid
from authz.proxy.sidecar import Sidecar
from authz.request import Request, Workload
from tests.integration.proxy_upstream import Upstream, echo, raw_exchange, service_entry, sidecar_config

pytestmark = pytest.mark.integration

TD = "cluster.local"


class FakeAuthorizer:
    """Denies the ``evil`` service account and ``/forbidden``; allows the rest and adds a header."""

    def __init__(self) -> None:
        self.seen: list[tuple[Request, Workload]] = []
        self.broken = False

    async def check(self, request: Request, workload: Workload) -> Decision:
        self.seen.append((request, workload))
        if self.broken:
            raise DependencyError("engine down")
        assert request.http is not None
        if request.source.principal.endswith("/sa/evil") or request.http.path.startswith("/forbidden"):
            return Decision(
                allowed=False,
                status=403,
                reason=Reason.DENIED_BY_POLICY,
                message="RBAC: access denied",
                decision_id="d-123",
            )
        if request.http.path.startswith("/login"):
            return Decision(
                allowed=False,
                status=401,
                reason=Reason.INVALID_TOKEN,
                www_authenticate='Bearer error="invalid_token"',
            )
        return Decision(
            allowed=True,
            status=200,
            reason=Reason.ALLOWED_BY_POLICY,
            headers=HeaderOps(
                set=(("x-authz-principal", request.source.principal),), response=(("x-checked", "1"),)
            ),
        )


def proxy_config(name: str, sa: str, cert_dir: Path, *, inbound_app: int | None, mode: str) -> str:
    inbound = f"  inbound: {{port: 0, appPort: {inbound_app}}}\n" if inbound_app else ""
    return f"""
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: {name}, namespace: default}}
spec:
  workload: {{namespace: default, serviceAccount: {sa}, labels: {{app: {name}}}}}
  outbound: {{port: 0}}
{inbound}  identity: {{certDir: {cert_dir}}}
  accessLog: false
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec:
  mtls: {{mode: {mode}}}
"""


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    ca = create_ca(TD)
    dirs = {}
    for sa in ("a", "b", "evil"):
        dirs[sa] = tmp_path / sa
        write_svid(issue_svid(ca, f"spiffe://{TD}/ns/default/sa/{sa}"), dirs[sa])
    app = await Upstream(echo).start()
    authorizer = FakeAuthorizer()
    b = Sidecar(
        sidecar_config(proxy_config("b", "b", dirs["b"], inbound_app=app.port, mode="STRICT")),  # type: ignore[arg-type]
        authorizer=authorizer,
    )
    await b.start()
    assert b.inbound is not None
    clients = []
    for sa in ("a", "evil"):
        text = (
            proxy_config(sa, sa, dirs[sa], inbound_app=None, mode="STRICT")
            + "---\n"
            + service_entry(
                "b.example.com",
                [b.inbound.port],
                labels=[{"security.istio.io/tlsMode": "istio"}],
                extra="\n    serviceAccount: b",
            )
        )
        side = Sidecar(sidecar_config(text))  # type: ignore[arg-type]
        await side.start()
        clients.append(side)
    yield {
        "a": clients[0],
        "evil": clients[1],
        "b": b,
        "app": app,
        "authz": authorizer,
        "dirs": dirs,
        "ca": ca,
    }
    for s in (*clients, b):
        await s.stop()
    await app.close()


def outbound(side: object) -> str:
    assert isinstance(side, Sidecar) and side.outbound is not None
    return f"http://127.0.0.1:{side.outbound.port}"


async def test_mtls_between_two_proxies_passes_the_spiffe_id(mesh: dict[str, object]) -> None:
    async with httpx.AsyncClient(base_url=outbound(mesh["a"])) as c:
        r = await c.get("/hello", headers={"host": "b.example.com"})
        r2 = await c.get("/again", headers={"host": "b.example.com"})
    assert r.status_code == 200, r.text
    assert r2.status_code == 200
    assert r.headers["x-checked"] == "1"
    seen = json.loads(r.content)
    assert seen["headers"]["x-authz-principal"] == f"spiffe://{TD}/ns/default/sa/a"
    authz = mesh["authz"]
    assert isinstance(authz, FakeAuthorizer)
    request, workload = authz.seen[0]
    assert request.source.principal == f"spiffe://{TD}/ns/default/sa/a"
    assert request.source.certificate.startswith("-----BEGIN CERTIFICATE-----")
    assert request.destination.principal == f"spiffe://{TD}/ns/default/sa/b"
    assert request.http is not None and request.http.path == "/hello"
    assert request.http.headers["host"] == "b.example.com" if "host" in request.http.headers else True
    assert workload.namespace == "default" and workload.labels == {"app": "b"}
    app = mesh["app"]
    assert isinstance(app, Upstream)
    assert app.connections == 1  # the inbound side pools its app connections too


async def test_unauthorized_peer_is_denied_with_json_body(mesh: dict[str, object]) -> None:
    async with httpx.AsyncClient(base_url=outbound(mesh["evil"])) as c:
        r = await c.get("/hello", headers={"host": "b.example.com"})
    assert r.status_code == 403
    assert r.headers["x-authz-decision-id"] == "d-123"
    assert r.json()["reason"] == "denied_by_policy"
    app = mesh["app"]
    assert isinstance(app, Upstream) and app.requests == []


async def test_401_carries_www_authenticate(mesh: dict[str, object]) -> None:
    async with httpx.AsyncClient(base_url=outbound(mesh["a"])) as c:
        r = await c.get("/login", headers={"host": "b.example.com"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_authorizer_failure_fails_closed(mesh: dict[str, object]) -> None:
    authz = mesh["authz"]
    assert isinstance(authz, FakeAuthorizer)
    authz.broken = True
    async with httpx.AsyncClient(base_url=outbound(mesh["a"])) as c:
        r = await c.get("/hello", headers={"host": "b.example.com"})
    assert r.status_code == 403
    assert r.json()["reason"] == "dependency_unavailable"


async def test_strict_rejects_plaintext(mesh: dict[str, object]) -> None:
    b = mesh["b"]
    assert isinstance(b, Sidecar) and b.inbound is not None
    reply = await raw_exchange(b.inbound.port, b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", timeout=1.0)
    assert not reply.startswith(b"HTTP/1.1 200")
    app = mesh["app"]
    assert isinstance(app, Upstream) and app.requests == []


async def test_client_from_a_foreign_ca_is_rejected(mesh: dict[str, object], tmp_path: Path) -> None:
    b = mesh["b"]
    assert isinstance(b, Sidecar) and b.inbound is not None
    foreign = tmp_path / "foreign"
    write_svid(issue_svid(create_ca(TD), f"spiffe://{TD}/ns/default/sa/a"), foreign)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(foreign / "cert.pem", foreign / "key.pem")
    ctx.load_verify_locations(mesh["dirs"]["b"] / "bundle.pem")  # type: ignore[index]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, httpx.HTTPError)):
        async with httpx.AsyncClient(verify=ctx) as c:
            await c.get(f"https://127.0.0.1:{b.inbound.port}/", headers={"host": "b.example.com"})
    app = mesh["app"]
    assert isinstance(app, Upstream) and app.requests == []


async def test_permissive_accepts_plaintext_and_mtls(tmp_path: Path) -> None:
    ca = create_ca(TD)
    write_svid(issue_svid(ca, f"spiffe://{TD}/ns/default/sa/b"), tmp_path / "b")
    write_svid(issue_svid(ca, f"spiffe://{TD}/ns/default/sa/a"), tmp_path / "a")
    app = await Upstream(echo).start()
    authz = FakeAuthorizer()
    b = Sidecar(
        sidecar_config(proxy_config("b", "b", tmp_path / "b", inbound_app=app.port, mode="PERMISSIVE")),  # type: ignore[arg-type]
        authorizer=authz,
    )
    await b.start()
    try:
        assert b.inbound is not None
        async with httpx.AsyncClient() as c:
            plain = await c.get(f"http://127.0.0.1:{b.inbound.port}/plain", headers={"host": "b"})
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_cert_chain(tmp_path / "a" / "cert.pem", tmp_path / "a" / "key.pem")
        ctx.load_verify_locations(tmp_path / "a" / "bundle.pem")
        async with httpx.AsyncClient(verify=ctx) as c:
            tls = await c.get(f"https://127.0.0.1:{b.inbound.port}/tls", headers={"host": "b"})
        assert plain.status_code == 200 and tls.status_code == 200
        assert [r.source.principal for r, _ in authz.seen] == ["", f"spiffe://{TD}/ns/default/sa/a"]
    finally:
        await b.stop()
        await app.close()


async def test_outbound_refuses_a_server_with_the_wrong_identity(
    mesh: dict[str, object], tmp_path: Path
) -> None:
    b = mesh["b"]
    assert isinstance(b, Sidecar) and b.inbound is not None
    dirs = mesh["dirs"]
    text = (
        proxy_config("a2", "a", dirs["a"], inbound_app=None, mode="STRICT")
        + "---\n"
        + service_entry(  # type: ignore[index]
            "b.example.com",
            [b.inbound.port],
            labels=[{"security.istio.io/tlsMode": "istio"}],
            extra="\n    serviceAccount: c",
        )
    )
    side = Sidecar(sidecar_config(text))  # type: ignore[arg-type]
    await side.start()
    try:
        async with httpx.AsyncClient(base_url=outbound(side)) as c:
            r = await c.get("/", headers={"host": "b.example.com"})
        assert r.status_code == 503
    finally:
        await side.stop()
    await asyncio.sleep(0)

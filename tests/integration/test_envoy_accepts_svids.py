"""Envoy (BoringSSL) accepts the dev CA's files both ways: as a server requiring client SVIDs, and as a
client presenting its SVID to a Python ``ssl`` server. Crosses real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.identity.ca import create_ca, issue_svid, write_svid

pytestmark = [pytest.mark.integration, pytest.mark.envoy]

TD = "example.org"
ENVOY_ID = f"spiffe://{TD}/ns/mesh/sa/envoy"
CLIENT_ID = f"spiffe://{TD}/ns/shop/sa/alice"
UPSTREAM_ID = f"spiffe://{TD}/ns/shop/sa/backend"


def _envoy_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "envoy"
    return str(beside_python) if beside_python.exists() else shutil.which("envoy")


def _tls(files: dict[str, Path], *, sni: str = "") -> dict[str, Any]:
    """A TLS context block: our SVID, the bundle as trust anchor, peers restricted to the trust domain."""
    context: dict[str, Any] = {
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(files["chain"])},
                    "private_key": {"filename": str(files["key"])},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(files["bundle"])},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TD}/"}}
                ],
            },
        }
    }
    if sni:
        context["sni"] = sni
    return context


def _envoy_config(envoy_files: dict[str, Path], upstream_port: int) -> dict[str, Any]:
    downstream: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
    }
    downstream |= _tls(envoy_files)
    downstream["require_client_certificate"] = True
    upstream: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    }
    upstream |= _tls(envoy_files, sni="backend")
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "mtls",
        "route_config": {
            "response_headers_to_add": [{"header": {"key": "x-peer", "value": "%DOWNSTREAM_PEER_URI_SAN%"}}],
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/up"}, "route": {"cluster": "backend"}},
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                        },
                    ],
                }
            ],
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
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "mtls",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": downstream,
                            },
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "backend",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": upstream},
                }
            ],
        },
    }


def _context(side: ssl._SSLMethod, files: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.load_cert_chain(files["chain"], files["key"])
    ctx.load_verify_locations(files["bundle"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False
    return ctx


def _uri_san(peer: Any) -> str:
    return ",".join(value for kind, value in peer.get("subjectAltName", ()) if kind == "URI")


class _Backend:
    """A tiny HTTPS/1.1 server requiring a client certificate; answers with the client's URI SAN."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.ctx = _context(ssl.PROTOCOL_TLS_SERVER, files)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    body = _uri_san(tls.getpeercert()).encode()
                    head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
                    tls.sendall(head.encode() + body)
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[int, dict[str, Path], dict[str, Path]]]:
    envoy = _envoy_binary()
    if envoy is None:
        pytest.skip("envoy binary not installed")
    ca = create_ca(TD)
    envoy_files = write_svid(issue_svid(ca, ENVOY_ID), tmp_path / "envoy")
    client_files = write_svid(issue_svid(ca, CLIENT_ID), tmp_path / "client")
    backend_files = write_svid(issue_svid(ca, UPSTREAM_ID), tmp_path / "backend")
    stranger_files = write_svid(issue_svid(create_ca(TD), CLIENT_ID), tmp_path / "stranger")
    stranger_files["bundle"] = envoy_files["bundle"]
    backend = _Backend(backend_files)
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(_envoy_config(envoy_files, backend.port)))
    admin_file = tmp_path / "admin.txt"
    log = (tmp_path / "envoy.log").open("wb")
    proc = subprocess.Popen(
        [envoy, "-c", str(config), "--admin-address-path", str(admin_file), "--disable-hot-restart",
         "--concurrency", "1", "-l", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        port = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if admin_file.exists() and admin_file.read_text().strip():
                try:
                    with urllib.request.urlopen(
                        f"http://{admin_file.read_text().strip()}/listeners?format=json", timeout=2
                    ) as r:
                        listeners = json.load(r)["listener_statuses"]
                    port = int(listeners[0]["local_address"]["socket_address"]["port_value"])
                    if port:
                        break
                except (OSError, KeyError, IndexError, ValueError):
                    pass
            time.sleep(0.1)
        if not port:
            log.flush()
            pytest.fail("envoy did not start: " + (tmp_path / "envoy.log").read_text()[-3000:])
        yield port, client_files, stranger_files
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        backend.close()


def _get(port: int, files: dict[str, Path], path: str) -> tuple[str, str, str]:
    """GET over mTLS; return (status line, x-peer header, body) and the server's URI SAN as seen by us."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, files)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        server_id = _uri_san(tls.getpeercert())
        tls.sendall(f"GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n".encode())
        data = b""
        for _ in range(1000):
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    peer = next(
        (v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "x-peer"), ""
    )
    assert server_id == ENVOY_ID
    return lines[0], peer, body


def test_envoy_accepts_svids_both_ways(mesh: tuple[int, dict[str, Path], dict[str, Path]]) -> None:
    port, client_files, _ = mesh
    status, peer, body = _get(port, client_files, "/")
    assert status == "HTTP/1.1 200 OK"
    assert peer == CLIENT_ID  # Envoy verified our client SVID and read its URI SAN
    status, _, body = _get(port, client_files, "/up")
    assert status == "HTTP/1.1 200 OK"
    assert body == ENVOY_ID  # the Python backend verified Envoy's client SVID


def test_envoy_refuses_a_client_from_another_root(mesh: tuple[int, dict[str, Path], dict[str, Path]]) -> None:
    port, _, stranger_files = mesh
    try:
        status, peer, _ = _get(port, stranger_files, "/")
    except (ssl.SSLError, ConnectionError):
        return  # the handshake was refused: what we expect
    assert status == "", f"a client from an unknown root got {status!r} as {peer!r}"  # closed without answer

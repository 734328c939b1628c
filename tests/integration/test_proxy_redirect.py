"""VirtualService ``redirect`` and ``directResponse`` over real sockets: the proxy answers itself, the
upstream sees nothing, the route's response headers apply, and the access log / metrics say what Envoy's
would (no response flag, no upstream host or cluster)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from authz.proxy.sidecar import Sidecar
from tests.integration.proxy_upstream import Upstream, raw_exchange, service_entry, sidecar_config

pytestmark = pytest.mark.integration

HOST = "app.example.com"

PROXY = """
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {name: sidecar, namespace: default}
spec:
  outbound: {port: 0}
  admin: {port: 0}
  accessLog: true
"""

VIRTUAL_SERVICE = f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - name: moved
    match: [{{uri: {{prefix: /old}}}}]
    redirect: {{uri: /new, authority: new.example.com}}
    headers: {{response: {{set: {{x-route: moved}}}}, request: {{set: {{x-ignored: "1"}}}}}}
  - name: found
    match: [{{uri: {{prefix: /found}}}}]
    redirect: {{scheme: https, port: 8443, redirectCode: 302}}
  - name: permanent
    match: [{{uri: {{prefix: /perm}}}}]
    redirect: {{uri: "/elsewhere?fixed=1", redirectCode: 308}}
  - name: request-port
    match: [{{uri: {{prefix: /port}}}}]
    redirect: {{uri: /p, derivePort: FROM_REQUEST_PORT}}
  - name: teapot
    match: [{{uri: {{exact: /teapot}}}}]
    directResponse: {{status: 418, body: {{string: "short and stout"}}}}
    headers: {{response: {{set: {{x-route: teapot}}, remove: [content-type]}}}}
  - name: bytes
    match: [{{uri: {{exact: /bytes}}}}]
    directResponse: {{status: 200, body: {{bytes: AAEC/w==}}}}
  - name: empty
    match: [{{uri: {{exact: /empty}}}}]
    directResponse: {{status: 204}}
  - name: forward
    route: [{{destination: {{host: {HOST}}}}}]
"""


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[Sidecar, Upstream]]:
    upstream = await Upstream().start()
    config = sidecar_config(
        PROXY + "---\n" + VIRTUAL_SERVICE + "---\n" + service_entry(HOST, [upstream.port])
    )
    sidecar = Sidecar(config)  # type: ignore[arg-type]
    await sidecar.start()
    yield sidecar, upstream
    await sidecar.stop()
    await upstream.close()


def url(sidecar: Sidecar) -> str:
    assert sidecar.outbound is not None
    return f"http://127.0.0.1:{sidecar.outbound.port}"


async def get(sidecar: Sidecar, path: str, host: str = HOST, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(base_url=url(sidecar)) as client:
        return await client.request(method, path, headers={"host": host})


async def test_redirect_301_replaces_path_and_host_and_keeps_the_query(
    proxy: tuple[Sidecar, Upstream],
) -> None:
    sidecar, upstream = proxy
    r = await get(sidecar, "/old/page?x=1&y=2")
    assert r.status_code == 301
    assert r.headers["location"] == "http://new.example.com/new?x=1&y=2"
    assert r.headers["content-length"] == "0" and r.content == b""
    assert r.headers["x-route"] == "moved"  # the rule's response headers apply to the redirect
    assert upstream.requests == []  # answered without contacting any upstream


async def test_redirect_302_scheme_and_port(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy
    r = await get(sidecar, "/found/x?q", host=f"{HOST}:80")
    assert r.status_code == 302
    assert r.headers["location"] == f"https://{HOST}:8443/found/x?q"
    assert upstream.requests == []


async def test_redirect_308_uri_with_its_own_query_replaces_the_request_query(
    proxy: tuple[Sidecar, Upstream],
) -> None:
    sidecar, _ = proxy
    r = await get(sidecar, "/perm?dropped=1")
    assert (r.status_code, r.headers["location"]) == (308, f"http://{HOST}/elsewhere?fixed=1")


async def test_redirect_from_request_port(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, _ = proxy
    assert (await get(sidecar, "/port", host=f"{HOST}:9080")).headers["location"] == f"http://{HOST}:9080/p"
    assert (await get(sidecar, "/port")).headers["location"] == f"http://{HOST}/p"


async def test_direct_response_status_body_and_headers(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy
    r = await get(sidecar, "/teapot")
    assert (r.status_code, r.content) == (418, b"short and stout")
    assert r.headers["content-length"] == "15"
    assert r.headers["x-route"] == "teapot"
    assert "content-type" not in r.headers  # response header removal applies too
    b = await get(sidecar, "/bytes")
    assert (b.status_code, b.content, b.headers["content-type"]) == (200, b"\x00\x01\x02\xff", "text/plain")
    assert upstream.requests == []


async def test_direct_response_head_and_204_have_no_body(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, _ = proxy
    head = await raw_exchange(
        sidecar.outbound.port if sidecar.outbound else 0,
        f"HEAD /teapot HTTP/1.1\r\nHost: {HOST}\r\n\r\nGET /empty HTTP/1.1\r\nHost: {HOST}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    first, _, second = head.partition(b"HTTP/1.1 204")
    assert first.startswith(b"HTTP/1.1 418") and b"content-length: 15\r\n" in first
    assert first.endswith(b"\r\n\r\n")  # the HEAD answer ends at its head, then the pipelined GET's
    assert b"content-length" not in second.lower() and second.endswith(b"\r\n\r\n")


async def test_other_rules_still_forward(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy
    r = await get(sidecar, "/something")
    assert r.status_code == 200 and json.loads(r.content)["target"] == "/something"
    assert len(upstream.requests) == 1


async def test_access_log_and_metrics_show_no_upstream_and_no_flag(
    proxy: tuple[Sidecar, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    sidecar, _ = proxy
    with caplog.at_level(logging.INFO, logger="authz.proxy.access"):
        await get(sidecar, "/old")
        await get(sidecar, "/teapot")
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "authz.proxy.access"]
    assert [(e["response_code"], e["response_flags"], e["route_name"]) for e in lines] == [
        (301, "-", "moved"),
        (418, "-", "teapot"),
    ]
    assert all(e["upstream_host"] == "-" and e["upstream_cluster"] == "-" for e in lines)
    assert sidecar.admin is not None
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{sidecar.admin.port}/metrics")).text
    for code in ("301", "418"):
        series = [
            line
            for line in text.splitlines()
            if line.startswith("istio_requests_total{") and f'response_code="{code}"' in line
        ]
        assert len(series) == 1 and 'response_flags="-"' in series[0]

"""HTTP/1.1 correctness of the proxy over real sockets: smuggling shapes, limits, HEAD/204/304/1xx, Expect,
hop-by-hop headers, streaming bodies, pipelining, and a listener that survives arbitrary bytes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.proxy.sidecar import Sidecar
from tests.integration.proxy_upstream import (
    Action,
    Recorded,
    Upstream,
    echo,
    raw_exchange,
    service_entry,
    sidecar_config,
)

pytestmark = pytest.mark.integration

PROXY = """
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {name: sidecar, namespace: default}
spec:
  outbound: {port: 0}
  admin: {port: 0}
  accessLog: false
"""


def behaviour(rec: Recorded) -> Action:
    path = rec.target
    if path.startswith("/status/"):
        return Action(int(path.split("/")[2]), body=b"" if path.endswith(("204", "304")) else b"x")
    if path == "/head":
        return Action(200, [("content-length", "12")], b"")
    if path == "/continue":
        return Action(200, body=b"after-100", informational=True)
    if path == "/chunked":
        return Action(200, body=b"0123456789" * 5, chunked=True)
    if path == "/hop":
        return Action(
            200, [("connection", "x-secret"), ("x-secret", "1"), ("keep-alive", "timeout=5")], b"hop"
        )
    if path == "/big":
        return Action(200, body=b"b" * 300_000)
    return echo(rec)


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[Sidecar, Upstream]]:
    upstream = await Upstream(behaviour).start()
    config = sidecar_config(PROXY + "---\n" + service_entry("app.example.com", [upstream.port]))
    sidecar = Sidecar(config)  # type: ignore[arg-type]
    await sidecar.start()
    yield sidecar, upstream
    await sidecar.stop()
    await upstream.close()


def port_of(sidecar: Sidecar) -> int:
    assert sidecar.outbound is not None
    return sidecar.outbound.port


async def test_get_is_forwarded_with_host_and_request_id(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, _upstream = proxy
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(sidecar)}") as client:
        r = await client.get("/hello?x=1", headers={"host": "app.example.com"})
    assert r.status_code == 200
    seen = json.loads(r.content)
    assert seen["target"] == "/hello?x=1"
    assert seen["headers"]["host"] == "app.example.com"
    assert len(seen["headers"]["x-request-id"]) == 36
    assert seen["headers"]["traceparent"].startswith("00-")


async def test_unknown_host_is_404_nr(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(sidecar)}") as client:
        r = await client.get("/", headers={"host": "nowhere.example.com"})
    assert r.status_code == 404
    assert upstream.requests == []


H = b"Host: app.example.com\r\n"
SMUGGLING = {
    "cl-and-te": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two-equal-cl": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "cl-list": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 5\r\n\r\nabc", 400),
    "cl-plus": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    "te-in-http10": (b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te-gzip-chunked": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "te-chunked-identity": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    "no-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET / HTTP/1.1\r\n" + H + b"Host: evil.example.com\r\n\r\n", 400),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost : app.example.com\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n  folded\r\n\r\n", 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: app.example.com\n\n", 400),
    "100k-header": (b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (100 * 1024) + b"\r\n\r\n", 431),
    "200-headers": (
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n",
        431,
    ),
    "upgrade": (b"GET / HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\nConnection: upgrade\r\n\r\n", 501),
    "chunk-size-overflow": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n",
        400,
    ),
}


@pytest.mark.parametrize(("request_bytes", "status"), list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_smuggling_shapes_are_rejected_and_never_forwarded(
    proxy: tuple[Sidecar, Upstream], request_bytes: bytes, status: int
) -> None:
    sidecar, upstream = proxy
    reply = await raw_exchange(port_of(sidecar), request_bytes)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:100]
    assert b"connection: close" in reply.lower()
    assert upstream.requests == []


async def test_head_response_does_not_corrupt_keepalive(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, _upstream = proxy
    host = b"Host: app.example.com\r\n"
    reply = await raw_exchange(
        port_of(sidecar),
        b"HEAD /head HTTP/1.1\r\n"
        + host
        + b"\r\nGET /after HTTP/1.1\r\n"
        + host
        + b"Connection: close\r\n\r\n",
    )
    first, _, rest = reply.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200")
    assert b"content-length: 12" in first.lower()
    assert rest.startswith(b"HTTP/1.1 200"), rest[:80]
    assert b'"target": "/after"' in rest


@pytest.mark.parametrize("code", [204, 304])
async def test_204_and_304_have_no_body_and_keep_the_connection(
    proxy: tuple[Sidecar, Upstream], code: int
) -> None:
    sidecar, _upstream = proxy
    host = b"Host: app.example.com\r\n"
    reply = await raw_exchange(
        port_of(sidecar),
        b"GET /status/%d HTTP/1.1\r\n" % code
        + host
        + b"\r\nGET /next HTTP/1.1\r\n"
        + host
        + b"Connection: close\r\n\r\n",
    )
    first, _, rest = reply.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 %d" % code)
    assert b"transfer-encoding" not in first.lower()
    assert rest.startswith(b"HTTP/1.1 200"), rest[:80]


async def test_upstream_1xx_is_dropped_and_final_response_delivered(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, _ = proxy
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(sidecar)}") as client:
        r1 = await client.get("/continue", headers={"host": "app.example.com"})
        r2 = await client.get("/again", headers={"host": "app.example.com"})
    assert (r1.status_code, r1.content) == (200, b"after-100")
    assert r2.status_code == 200


async def test_expect_100_continue_is_answered_by_the_proxy(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(sidecar))
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: app.example.com\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()
    await asyncio.sleep(0.05)
    assert upstream.requests[0].body == b"hello"
    assert "expect" not in upstream.requests[0].headers


async def test_chunked_request_and_response_are_reframed(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy

    async def gen() -> AsyncIterator[bytes]:
        for part in (b"abc", b"defg", b"h"):
            yield part

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(sidecar)}") as client:
        r = await client.post("/echo", content=gen(), headers={"host": "app.example.com"})
        c = await client.get("/chunked", headers={"host": "app.example.com"})
    assert upstream.requests[0].body == b"abcdefgh"
    assert upstream.requests[0].headers["transfer-encoding"] == "chunked"
    assert "content-length" not in upstream.requests[0].headers
    assert r.status_code == 200
    assert c.content == b"0123456789" * 5
    assert c.headers["transfer-encoding"] == "chunked"


async def test_hop_by_hop_headers_are_stripped_both_ways(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(sidecar)}") as client:
        r = await client.get(
            "/hop",
            headers={
                "host": "app.example.com",
                "connection": "keep-alive, x-private",
                "x-private": "p",
                "te": "trailers",
                "proxy-authorization": "Basic x",
                "keep-alive": "timeout=1",
                "x-normal": "n",
            },
        )
    seen = upstream.requests[0].headers
    for name in ("x-private", "te", "proxy-authorization", "keep-alive"):
        assert name not in seen
    assert seen["x-normal"] == "n"
    assert "x-secret" not in r.headers
    assert "keep-alive" not in r.headers


async def test_large_body_streams_through(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy
    payload = bytes(range(256)) * 2048  # 512 KiB, above the replay buffer: streamed, not retried
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(sidecar)}") as client:
        r = await client.post("/upload", content=payload, headers={"host": "app.example.com"})
        big = await client.get("/big", headers={"host": "app.example.com"})
    assert r.status_code == 200
    assert upstream.requests[0].body == payload
    assert big.content == b"b" * 300_000


async def test_pipelined_requests_are_answered_in_order(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, _upstream = proxy
    host = b"Host: app.example.com\r\n"
    reqs = b"".join(b"GET /p%d HTTP/1.1\r\n" % i + host + b"\r\n" for i in range(5))
    reply = await raw_exchange(
        port_of(sidecar), reqs + b"GET /last HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n"
    )
    order = [int(x) for x in __import__("re").findall(rb'"target": "/p(\d)"', reply)]
    assert order == [0, 1, 2, 3, 4]
    assert reply.count(b"HTTP/1.1 200") == 6


async def test_http10_request_without_length_response(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, _upstream = proxy
    reply = await raw_exchange(port_of(sidecar), b"GET /chunked HTTP/1.0\r\nHost: app.example.com\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"0123456789" * 5


async def test_upstream_connections_are_kept_alive(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, upstream = proxy
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(sidecar)}") as client:
        for _ in range(10):
            assert (await client.get("/", headers={"host": "app.example.com"})).status_code == 200
    assert upstream.connections == 1


async def test_admin_serves_istio_metrics(proxy: tuple[Sidecar, Upstream]) -> None:
    sidecar, _upstream = proxy
    assert sidecar.admin is not None
    async with httpx.AsyncClient() as client:
        await client.get(f"http://127.0.0.1:{port_of(sidecar)}/", headers={"host": "app.example.com"})
        await client.get(f"http://127.0.0.1:{port_of(sidecar)}/", headers={"host": "nowhere"})
        text = (await client.get(f"http://127.0.0.1:{sidecar.admin.port}/metrics")).text
    assert "istio_requests_total{" in text
    assert 'response_code="404"' in text and 'response_flags="NR"' in text
    assert "istio_request_duration_milliseconds_bucket" in text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=2048))
async def test_listener_survives_arbitrary_bytes(proxy: tuple[Sidecar, Upstream], junk: bytes) -> None:
    sidecar, _upstream = proxy
    reply = await raw_exchange(port_of(sidecar), junk, timeout=0.3)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 ")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_of(sidecar)}") as client:
        r = await client.get("/alive", headers={"host": "app.example.com"})
    assert r.status_code == 200

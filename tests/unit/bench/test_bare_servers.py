"""The bare check servers of rows 3gb/3hb, started as subprocesses on 127.0.0.1:0 and spoken to over a real
socket, and the row that puts Envoy in front of them."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import configs
from bench.processes import (
    ManagedProcess,
    ProcessSet,
    StartupError,
    parse_listening_line,
    wait_listening,
)
from bench.rows import (
    BARE_PROCESS,
    BARE_SERVER_SCRIPTS,
    BenchContext,
    BenchOptions,
    RowSpec,
    _setup,
    bare_server_command,
    check_enforcement,
    start_envoy,
)
from bench.tokens import mint_key, public_jwks

STARTUP_S = 20.0
ENVOY = Path(sys.executable).with_name("envoy")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessSet]:
    with ProcessSet(tmp_path) as started:
        yield started


def start(procs: ProcessSet, mode: Literal["grpc", "http"]) -> tuple[ManagedProcess, int]:
    proc = procs.start(f"bare-{mode}", bare_server_command(mode))
    return proc, wait_listening(proc, timeout_s=STARTUP_S)


def recv_until_closed(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


ALLOW = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
CHECK = (
    b"GET /api/items HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer abc\r\n"
    b"x-authz-namespace: +default\r\ncontent-length: 0\r\n\r\n"
)


# -- HTTP ---------------------------------------------------------------------------------------------


def test_http_floor_answers_every_check_200_on_one_keep_alive_connection(procs: ProcessSet) -> None:
    proc, port = start(procs, "http")
    assert "uvloop" in proc.log_tail()  # like authz serve (authz/eventloop.py); uvloop is a dependency
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(3):  # sequential checks reuse the connection, as Envoy's http_service does
            sock.sendall(CHECK)
            assert recv_exactly(sock, len(ALLOW)) == ALLOW
        # Pipelined, with a body (Envoy can forward one), answered in order.
        post = b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello"
        sock.sendall(CHECK + post + CHECK)
        assert recv_exactly(sock, 3 * len(ALLOW)) == 3 * ALLOW
    assert proc.alive()


def test_http_floor_honours_connection_close_and_rejects_garbage(procs: ProcessSet) -> None:
    _, port = start(procs, "http")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        assert recv_until_closed(sock) == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # HTTP/1.0 without keep-alive closes too
        assert recv_until_closed(sock).startswith(b"HTTP/1.1 200 OK\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert recv_until_closed(sock).startswith(b"HTTP/1.1 400 Bad Request\r\n")


# -- gRPC ---------------------------------------------------------------------------------------------


def check_request() -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/api/items", "127.0.0.1"
    http.headers["authorization"] = "Bearer abc"
    req.attributes.context_extensions["namespace"] = "default"
    return req


def test_grpc_floor_answers_every_check_ok(procs: ProcessSet) -> None:
    proc, port = start(procs, "grpc")
    assert "uvloop" in proc.log_tail()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for request in (check_request(), external_auth_pb2.CheckRequest()):
            response = stub.Check(request, timeout=5)
            assert response.status.code == grpc.StatusCode.OK.value[0] == 0
            assert response.HasField("ok_response")
            assert not response.HasField("denied_response")
        # Only Check is served: anything else is UNIMPLEMENTED, not a silent OK.
        other = channel.unary_unary("/envoy.service.auth.v3.Authorization/Nope")
        with pytest.raises(grpc.RpcError) as info:
            other(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- both -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_sigterm_stops_the_server_cleanly(procs: ProcessSet, mode: Literal["grpc", "http"]) -> None:
    proc, _ = start(procs, mode)
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(timeout=10) == 0


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_a_busy_port_is_a_startup_error_not_a_hang(procs: ProcessSet, mode: Literal["grpc", "http"]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = procs.start(f"bare-{mode}", bare_server_command(mode, port))
        with pytest.raises(StartupError, match=f"bare-{mode} exited with code 1"):
            wait_listening(proc, timeout_s=STARTUP_S)


def test_commands_run_the_scripts_next_to_the_harness() -> None:
    for mode in ("grpc", "http"):
        argv = bare_server_command(mode, 1234)
        assert argv[0] == sys.executable
        assert Path(argv[1]) == BARE_SERVER_SCRIPTS[mode] and Path(argv[1]).is_file()
        assert argv[2:] == ["--host", "127.0.0.1", "--port", "1234"]


def test_parse_listening_line() -> None:
    assert parse_listening_line("listening on 127.0.0.1:4242 (uvloop)\n") == 4242
    assert parse_listening_line("warning: x\nlistening on 127.0.0.1:80 (asyncio)\nmore") == 80
    assert parse_listening_line("") is None
    assert parse_listening_line("listening on 127.0.0.1:") is None
    assert parse_listening_line("listening on 127.0.0.1:0 (uvloop)") is None  # port 0 was never bound
    assert parse_listening_line("listening on 127.0.0.1:99999 (uvloop)") is None
    assert parse_listening_line("listening on 10.0.0.1:80") is None  # loopback only
    assert parse_listening_line("not listening on 127.0.0.1:80") is None


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 65535), st.text(max_size=40).filter(lambda t: "listening" not in t))
def test_parse_listening_line_finds_the_port_after_any_noise(port: int, noise: str) -> None:
    noise = noise.replace("\r", " ").replace("\n", " ")
    assert parse_listening_line(f"{noise}\nlistening on 127.0.0.1:{port} (uvloop)\n") == port


# -- behind Envoy, through the row-3 bootstrap ----------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.skipif(not ENVOY.exists() and shutil.which("envoy") is None, reason="envoy binary not installed")
@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_envoy_with_the_row_three_bootstrap_allows_through_the_floor(
    tmp_path: Path, mode: Literal["grpc", "http"]
) -> None:
    """The floor row as the harness runs it: Envoy's ext_authz (failure_mode_allow false) asks the bare
    server; a request without any token reaches the upstream, so the check was answered OK."""
    key = mint_key("RS256")
    opts = BenchOptions(envoy=str(ENVOY) if ENVOY.exists() else "envoy")
    ctx = BenchContext(options=opts, tmp=tmp_path, key=key, jwks=public_jwks(key), token="not-a-jwt")
    spec = RowSpec("3xb", "t", "bare_ext_authz", mode=mode, auth=False)
    with ProcessSet(tmp_path) as procs:
        ctx.upstream_port, ctx.upstream_pid = start_envoy(
            ctx, procs, "upstream", configs.upstream_bootstrap(), "upstream"
        )
        port, tracked = _setup(ctx, spec, procs)
        check_enforcement(port, ctx.token, auth=False)
        assert set(tracked) == {"upstream", "envoy", BARE_PROCESS}
        # With the bare server gone, the same request is denied (403 status_on_error): it was in the path.
        bare = next(p for p in procs.processes if p.name == f"bare-{mode}")
        procs.stop(bare)
        with pytest.raises(RuntimeError, match="HTTP 403"):
            check_enforcement(port, ctx.token, auth=False)


# -- the bare forwarding proxy (row 4p) ------------------------------------------------------------------


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One content-length framed response: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(
            v for k, _, v in (line.partition(b": ") for line in head.split(b"\r\n")) if k == b"content-length"
        )
    )
    return head, rest + recv_exactly(sock, length - len(rest))


def test_bare_proxy_forwards_sequential_and_pipelined_requests(procs: ProcessSet) -> None:
    import json

    from bench.rows import bare_proxy_command
    from tests.integration.envoy_harness import echo_upstream

    with echo_upstream() as upstream:
        proc = procs.start("bare-proxy", bare_proxy_command(upstream.server_address[1]))
        port = wait_listening(proc, timeout_s=STARTUP_S)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for i in range(3):
                sock.sendall(
                    b"GET /a/%d?q=1 HTTP/1.1\r\nhost: svc\r\nx-k: v\r\nconnection: keep-alive\r\n\r\n" % i
                )
                head, body = _read_response(sock)
                assert head.startswith(b"HTTP/1.1 200 ")
                seen = json.loads(body)
                assert seen["path"] == f"/a/{i}?q=1" and seen["headers"]["x-k"] == "v"
                assert seen["headers"]["host"] == "svc" and "connection" not in seen["headers"]
            sock.sendall(b"GET /p1 HTTP/1.1\r\nhost: svc\r\n\r\nGET /p2 HTTP/1.1\r\nhost: svc\r\n\r\n")
            assert [json.loads(_read_response(sock)[1])["path"] for _ in range(2)] == ["/p1", "/p2"]
            sock.sendall(b"POST /x HTTP/1.1\r\nhost: svc\r\ncontent-length: 2\r\n\r\nhi")
            assert recv_until_closed(sock).startswith(b"HTTP/1.1 501 ")  # bodies are out of its scope
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"\x00garbage\r\n\r\n")
            assert recv_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    assert proc.alive()


def test_bare_proxy_answers_502_when_the_upstream_is_gone(procs: ProcessSet) -> None:
    from bench.rows import bare_proxy_command
    from tests.integration.envoy_harness import free_port

    proc = procs.start("bare-proxy", bare_proxy_command(free_port()))
    port = wait_listening(proc, timeout_s=STARTUP_S)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
        head, _ = _read_response(sock)
        assert head.startswith(b"HTTP/1.1 502 ")


def test_header_reading_floor_answers_200_and_survives_odd_headers(procs: ProcessSet) -> None:
    proc = procs.start("bare-http", bare_server_command("http", read_headers=True))
    port = wait_listening(proc, timeout_s=STARTUP_S)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(CHECK)
            assert recv_exactly(sock, len(ALLOW)) == ALLOW
        sock.sendall(
            b"GET / HTTP/1.1\r\nhost: a\r\nx-bin: \xff\xfe\r\n\r\n"
        )  # not UTF-8: replaced, not fatal
        assert recv_exactly(sock, len(ALLOW)) == ALLOW
    assert proc.alive()


def test_bare_proxy_with_the_engine_forwards_allowed_and_answers_denied_in_order(
    procs: ProcessSet, tmp_path: Path
) -> None:
    """Row 4pe: the engine decides each request before it is forwarded; a deny is answered in its turn."""
    import json
    import time

    from bench.rows import bare_proxy_command
    from bench.tokens import bench_claims, mint_token
    from tests.integration.envoy_harness import echo_upstream

    key = mint_key("ES256")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "bench.yaml").write_text(configs.bench_policy_yaml(public_jwks(key)), encoding="utf-8")
    token = mint_token(key, bench_claims(time.time())).encode()
    allowed = b"GET %s HTTP/1.1\r\nhost: svc\r\nauthorization: Bearer %s\r\n\r\n" % (
        configs.BENCH_PATH.encode(),
        token,
    )
    anonymous = b"GET %s HTTP/1.1\r\nhost: svc\r\n\r\n" % configs.BENCH_PATH.encode()
    with echo_upstream() as upstream:
        proc = procs.start("bare-proxy", bare_proxy_command(upstream.server_address[1], policies=policies))
        port = wait_listening(proc, timeout_s=STARTUP_S)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(allowed)
            head, body = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["path"] == configs.BENCH_PATH
            sock.sendall(anonymous + allowed + anonymous)  # pipelined: answers keep the order
            data = b""
            while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(b"\r\n\r\n"):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert re.findall(rb"HTTP/1\.1 (\d{3}) ", data) == [b"403", b"200", b"403"]
    assert proc.alive()

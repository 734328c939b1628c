"""The launcher's pure parts (ports, files, summary), the demo apps' HTTP parsing, and the supervisor's
process handling (SIGTERM, then SIGKILL after a bound; readiness waits that end)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import DependencyError
from authz.launcher import cli as launcher_cli
from authz.launcher.apps import AppResponse, HttpRequestError, orders_handler, parse_head, serve_app
from authz.launcher.mesh import (
    ISSUER_URL_IN_FILES,
    MeshLayout,
    MeshState,
    Ports,
    child_specs,
    idp_config_text,
    rewrite_issuer,
    spiffe_id,
)
from authz.launcher.supervisor import ChildSpec, Supervisor, port_in_use, tail


def state(tmp_path: Path) -> MeshState:
    return MeshState(
        base_port=9000, run_dir=str(tmp_path), authz_command=["authz"], policies_dir="p",
        idp_url="http://127.0.0.1:9000", issuer_url="http://127.0.0.1:9000/issuers/demo",
        client_id="orders-service", client_secret="s", frontend_url="http://127.0.0.1:9080",
        orders_url="https://127.0.0.1:9443", envoy_mode="grpc",
        svids={w: str(tmp_path / w) for w in ("frontend", "orders", "intruder")}, pids={"idp": 1},
    )  # fmt: skip


def test_default_ports_are_the_readme_ports() -> None:
    ports = Ports()
    assert (ports["idp"], ports["authz_grpc"], ports["authz_http"], ports["authz_admin"]) == (
        9000,
        9191,
        9192,
        9193,
    )
    assert len({p for _, p, _ in ports.described()}) == len(ports.described())


@given(st.integers(min_value=1024, max_value=64000))
@settings(max_examples=50)
def test_every_base_port_shifts_every_port(base: int) -> None:
    try:
        ports = Ports(base)
    except ValueError:
        assert base > 65535 - 903
        return
    assert all(base <= p <= 65535 for _, p, _ in ports.described())
    assert {p - base for _, p, _ in ports.described()} == {p - 9000 for _, p, _ in Ports().described()}


@pytest.mark.parametrize("base", [80, 65000])
def test_base_port_out_of_range_is_refused(base: int) -> None:
    with pytest.raises(ValueError, match="--base-port"):
        Ports(base)


def test_issuer_rewrite_and_idp_config() -> None:
    text = f"issuer: {ISSUER_URL_IN_FILES}\nrequestPrincipals: ['{ISSUER_URL_IN_FILES}/*']"
    out = rewrite_issuer(text, "http://127.0.0.1:21000/issuers/demo")
    assert ISSUER_URL_IN_FILES not in out and out.count("127.0.0.1:21000") == 2
    assert 'clientSecret: "a\\"b"' in idp_config_text('a"b')  # quoted, whatever the generated secret holds


def test_state_round_trips_and_children_start_in_order(tmp_path: Path) -> None:
    s = state(tmp_path)
    assert MeshState.from_json(s.to_json()) == s
    specs = child_specs(s, MeshLayout(tmp_path), python="py", envoy="envoy", ports=Ports())
    assert [c.name for c in specs] == [
        "idp", "authz", "orders-v1", "envoy-orders", "orders-v2", "proxy-orders-v2", "shadow",
        "proxy-frontend", "frontend",
    ]  # fmt: skip
    assert all(c.ready_url.startswith("http://127.0.0.1:") for c in specs)
    serve = specs[1].argv
    assert serve[serve.index("--grpc") + 1] == "127.0.0.1:9191"
    by_name = {c.name: c.argv for c in specs}
    # The frontend calls its sidecar in plain HTTP with the orders host; the sidecar does the mTLS.
    frontend = by_name["frontend"]
    assert frontend[frontend.index("--upstream") + 1] == "http://127.0.0.1:9501"
    assert frontend[frontend.index("--upstream-host") + 1] == "orders.orders.svc.cluster.local"
    assert "--svid" not in frontend
    proxy = by_name["proxy-frontend"]
    assert proxy[proxy.index("--config") + 1] == str(tmp_path / "proxy" / "frontend")
    assert spiffe_id("frontend") == "spiffe://cluster.local/ns/shop/sa/frontend"


def test_a_taken_port_is_named_with_the_flag_that_moves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        assert port_in_use("127.0.0.1", taken)
        base = taken - 193  # the authorizer admin port
        if base < 1024 or base > 65535 - 903:
            pytest.skip("ephemeral port outside the range a base can reach")
        parser = argparse.ArgumentParser()
        launcher_cli.register(parser.add_subparsers())
        args = parser.parse_args(["run", "--base-port", str(base), "--run-dir", str(tmp_path / "run")])
        assert args.func(args) == launcher_cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"127.0.0.1:{taken} (authorizer admin" in err and "--base-port" in err
    assert not (tmp_path / "run" / "ca").exists()  # refused before minting anything


@given(
    st.sampled_from(["GET", "POST", "delete"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30),
    st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
                    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20), max_size=5),
)  # fmt: skip
@settings(max_examples=100)
def test_parse_head_round_trips(method: str, target: str, headers: dict[str, str]) -> None:
    lines = [f"{method} /{target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    got_method, got_target, got_headers = parse_head("\r\n".join(lines).encode())
    assert (got_method, got_target) == (method.upper(), f"/{target}")
    expected: dict[str, list[str]] = {}
    for k, v in headers.items():
        expected.setdefault(k.lower(), []).append(v)
    assert got_headers == {k: ",".join(v) for k, v in expected.items()}


@given(st.binary(max_size=200))
@settings(max_examples=200)
def test_parse_head_never_crashes(data: bytes) -> None:
    try:
        parse_head(data)
    except HttpRequestError as exc:
        assert exc.status == 400


@pytest.mark.parametrize(
    "head", [b"GET /\r\n", b"GET / HTTP/2\r\n", b"GET / HTTP/1.1\r\nbad header", b"GET / HTTP/1.1\r\nx :1"]
)
def test_parse_head_refuses(head: bytes) -> None:
    with pytest.raises(HttpRequestError):
        parse_head(head)


async def test_orders_app_shows_identity_and_counts() -> None:
    server = await serve_app(orders_handler("v2"), "127.0.0.1", 0, name="orders-v2")
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.get("/orders/7", headers={"x-jwt-sub": "alice", "authorization": "Bearer t"})
            shadow = await c.get("/orders", headers={"host": "orders-shadow"})
            missing = await c.get("/nope")
            stats = (await c.get("/_stats")).json()
    finally:
        server.close()
        await server.wait_closed()
    assert r.status_code == 200 and r.headers["x-orders-version"] == "v2"
    assert r.json()["identity"] == {"x-jwt-sub": "alice"} and r.json()["authorization_forwarded"] is True
    assert shadow.status_code == 200 and missing.status_code == 404
    assert stats["requests"] == {"primary": 2, "shadow": 1}


def test_app_response_framing() -> None:
    raw = AppResponse.json(403, {"a": 1}).encode(keep_alive=False)
    assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n") and raw.endswith(b'\r\n\r\n{"a": 1}')
    assert b"content-length: 8\r\n" in raw and b"connection: close" in raw


STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    " print('up', flush=True); time.sleep(60)"
)


def test_stop_all_escalates_to_sigkill_within_the_bound(tmp_path: Path) -> None:
    said: list[str] = []
    sup = Supervisor(tmp_path, say=said.append, stop_timeout=0.5)
    polite = sup.start(ChildSpec("polite", (sys.executable, "-c", "import time; time.sleep(60)")))
    stubborn = sup.start(ChildSpec("stubborn", (sys.executable, "-c", STUBBORN)))
    deadline = time.monotonic() + 10
    while "up" not in tail(stubborn.log_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert sup.stop_all() == ["stubborn"]
    assert time.monotonic() - started < 5
    assert polite.process.returncode == -signal.SIGTERM and stubborn.process.returncode == -signal.SIGKILL
    assert any("SIGKILL" in s for s in said)


def test_wait_ready_reports_an_early_exit_with_its_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    child = sup.start(
        ChildSpec(
            "broken", (sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"), "http://127.0.0.1:1/"
        )
    )
    with pytest.raises(DependencyError, match="exited with code 3") as err:
        sup.wait_ready(child, timeout=10)
    assert "boom" in err.value.message
    sup.stop_all()


def test_wait_ready_gives_up_after_the_timeout(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    child = sup.start(
        ChildSpec("silent", (sys.executable, "-c", "import time; time.sleep(30)"), "http://127.0.0.1:1/")
    )
    started = time.monotonic()
    with pytest.raises(DependencyError, match="not ready after 1s"):
        sup.wait_ready(child, timeout=1)
    assert time.monotonic() - started < 5
    sup.stop_all()


def test_a_missing_tool_is_named(tmp_path: Path) -> None:
    with pytest.raises(DependencyError, match="cannot start ghost"):
        Supervisor(tmp_path).start(ChildSpec("ghost", (str(tmp_path / "no-such-binary"),)))

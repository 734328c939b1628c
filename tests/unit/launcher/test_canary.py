"""The canary part of the local mesh without processes: the bundled proxies' files load with the proxy's
own loader and route as described; weights round-trip; the demo's split, mirror and reload checks decide
correctly on canned answers (httpx.MockTransport)."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import DependencyError
from authz.launcher import cli as launcher_cli
from authz.launcher import demo
from authz.launcher.mesh import (
    INITIAL_CANARY_WEIGHTS,
    ORDERS_HOST,
    MeshLayout,
    MeshState,
    Ports,
    canary_virtual_service_text,
    canary_weights,
    frontend_proxy_text,
    orders_service_text,
    orders_v2_proxy_text,
    spiffe_id,
)
from authz.proxy.cluster import ClusterKey, ClusterManager
from authz.proxy.lb import pick_weighted
from authz.proxy.loader import load_sidecar_config
from authz.proxy.router import Router

PORTS = Ports(9000)


def write_frontend_proxy(layout: MeshLayout, weights: tuple[int, int] = INITIAL_CANARY_WEIGHTS) -> Path:
    folder = layout.proxy_dir("frontend")
    folder.mkdir(parents=True)
    (folder / "proxy.yaml").write_text(frontend_proxy_text(PORTS, layout.svid_dir("frontend")))
    (folder / "orders-service.yaml").write_text(orders_service_text(PORTS))
    layout.canary_file.write_text(canary_virtual_service_text(*weights))
    return folder


def test_the_frontend_proxy_files_load_and_route_the_canary(tmp_path: Path) -> None:
    layout = MeshLayout(tmp_path)
    config = load_sidecar_config(write_frontend_proxy(layout))
    s = config.settings
    assert s.spiffe_id == spiffe_id("frontend") and s.inbound is None and s.authorizer.mode == "none"
    assert s.outbound is not None and s.outbound.port == PORTS["frontend_proxy"]
    assert s.identity is not None and s.identity.cert == str(layout.svid_dir("frontend") / "cert.pem")
    match = Router(config.mesh).route(ORDERS_HOST, "GET", "/orders", {}, scheme="http")
    assert match is not None and match.route.name == "orders-canary"
    dests = {d.subset: d.weight for d in match.route.destinations}
    assert dests == {"v1": 90, "v2": 10}
    (mirror,) = match.route.mirrors
    assert (mirror.subset, mirror.percent) == ("shadow", 100.0)
    clusters = ClusterManager(config.mesh, ssl_context=lambda: None, trust_domain="cluster.local")
    ends = {
        subset: clusters.get(ClusterKey(ORDERS_HOST, None, subset)).endpoints
        for subset in ("v1", "v2", "shadow")
    }
    # v1 is Envoy's mTLS port, v2 the bundled proxy's inbound; both must present the orders SVID.
    assert [(e.port, e.tls, e.identity) for e in ends["v1"]] == [
        (PORTS["orders_envoy"], True, spiffe_id("orders"))
    ]
    assert [(e.port, e.tls, e.identity) for e in ends["v2"]] == [
        (PORTS["orders_v2_proxy"], True, spiffe_id("orders"))
    ]
    assert [(e.port, e.tls) for e in ends["shadow"]] == [(PORTS["shadow"], False)]


def test_the_weights_the_proxy_loads_give_the_split(tmp_path: Path) -> None:
    """The weights as loaded, fed to the proxy's own weighted pick (seeded): 90/10 then 50/50."""
    for weights, expected in (((90, 10), 0.10), ((50, 50), 0.50)):
        layout = MeshLayout(tmp_path / f"w{weights[0]}")
        config = load_sidecar_config(write_frontend_proxy(layout, weights))
        match = Router(config.mesh).route(ORDERS_HOST, "GET", "/orders", {}, scheme="http")
        assert match is not None
        rng = random.Random(7)
        route = match.route
        picks = Counter(
            pick_weighted(route.destinations, [d.weight for d in route.destinations], rng).subset
            for _ in range(2000)
        )
        assert abs(picks["v2"] / 2000 - expected) <= demo.split_tolerance(expected, 2000)


def test_the_orders_v2_proxy_authorizes_in_process_with_strict_mtls(tmp_path: Path) -> None:
    folder = tmp_path / "proxy" / "orders-v2"
    folder.mkdir(parents=True)
    policies = tmp_path / "policies"
    (folder / "proxy.yaml").write_text(orders_v2_proxy_text(PORTS, tmp_path / "svid" / "orders", policies))
    config = load_sidecar_config(folder)
    s = config.settings
    assert s.spiffe_id == spiffe_id("orders") and dict(s.labels) == {"app": "orders", "version": "v2"}
    assert s.inbound is not None and s.inbound.port == PORTS["orders_v2_proxy"]
    assert s.app_port == PORTS["orders_v2"]
    assert s.authorizer.mode == "local" and s.authorizer.policy_paths == (str(policies),)
    assert [p.mode for p in config.mesh.peer_authentications] == ["STRICT"]


@given(st.integers(0, 1000), st.integers(0, 1000))
@settings(max_examples=50)
def test_canary_weights_round_trip(v1: int, v2: int) -> None:
    assert canary_weights(canary_virtual_service_text(v1, v2)) == {"v1": v1, "v2": v2}


def test_canary_weights_defaults_and_refusals() -> None:
    one = "kind: VirtualService\nspec:\n  http:\n  - route:\n    - destination: {host: o, subset: v1}\n"
    assert canary_weights(one) == {"v1": 100}
    with pytest.raises(ValueError, match="no VirtualService"):
        canary_weights("kind: DestinationRule\nspec: {}\n")


def test_split_tolerance_separates_the_two_splits() -> None:
    n = demo.CANARY_REQUESTS
    low, high = 0.10 + demo.split_tolerance(0.10, n), 0.50 - demo.split_tolerance(0.50, n)
    assert low < high  # an observed 90/10 can never pass as 50/50, nor the reverse
    assert demo.split_tolerance(0.5, 100) == pytest.approx(4 * 0.05)
    assert demo.split_tolerance(0.1, 400) < demo.split_tolerance(0.1, 100)


def mesh_state(tmp_path: Path) -> MeshState:
    layout = MeshLayout(tmp_path)
    write_frontend_proxy(layout)
    return MeshState(
        base_port=9000, run_dir=str(tmp_path), authz_command=["authz"], policies_dir="p",
        idp_url="http://idp", issuer_url="http://idp/issuers/demo", client_id="c", client_secret="s",
        frontend_url="http://frontend", orders_url="https://envoy", envoy_mode="grpc", svids={},
        canary_file=str(layout.canary_file), frontend_proxy_admin_url="http://proxy-admin",
        app_urls={"orders-v1": "http://v1", "orders-v2": "http://v2", "shadow": "http://shadow"},
    )  # fmt: skip


class FakeMesh:
    """Answers like the running mesh: the frontend replies from v1/v2 in a fixed rotation, the proxy's
    /metrics counts a reload whenever the canary file changed, the apps count requests."""

    def __init__(self, state: MeshState, pattern: list[str], *, reload_result: str = "ok") -> None:
        self.state = state
        self.pattern = pattern
        self.calls = 0
        self.reload_result = reload_result
        self.seen_text = Path(state.canary_file).read_text()
        self.reloads = {"ok": 3, "error": 0}
        self.shadow = 0
        self.reload_enabled = True

    def handle(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if host == "frontend":
            version = self.pattern[self.calls % len(self.pattern)]
            self.calls += 1
            self.shadow += 1  # the mirror copy
            return httpx.Response(200, json={"orders": {"service": "orders", "version": version}})
        if host == "proxy-admin" and path == "/metrics":
            text = Path(self.state.canary_file).read_text()
            if text != self.seen_text and self.reload_enabled:
                self.seen_text = text
                self.reloads[self.reload_result] += 1
            lines = [
                f'meshauthz_proxy_config_reloads_total{{result="{k}"}} {v}.0' for k, v in self.reloads.items()
            ]
            return httpx.Response(200, text="# HELP x\n" + "\n".join(lines) + "\n")
        if path == "/_stats":
            counts = {"shadow": self.shadow} if host == "shadow" else {"primary": 0}
            return httpx.Response(200, json={"app": host, "requests": counts})
        return httpx.Response(404)


def client_for(fake: FakeMesh) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(fake.handle))


def test_the_canary_step_counts_versions_and_the_mirror_step_counts_copies(tmp_path: Path) -> None:
    state = mesh_state(tmp_path)
    fake = FakeMesh(state, ["v1"] * 9 + ["v2"])
    with client_for(fake) as client:
        split = demo.step_canary_split(state, client, "t", requests=100)
        mirror = demo.step_mirror(
            state,
            client,
            primaries=split.details["observation"],
            shadow_before=split.details["shadow_before"],
            orders_before=split.details["orders_before"],
            timeout=0.5,
        )
    assert split.ok and split.details["v2_share"] == pytest.approx(0.10)
    assert split.details["observation"].versions == {"v1": 90, "v2": 10}
    assert mirror.ok and mirror.details["mirrored"] == 100 and mirror.details["leaked"] == {"v1": 0, "v2": 0}


def test_a_split_off_its_weights_fails_the_step(tmp_path: Path) -> None:
    state = mesh_state(tmp_path)
    with client_for(FakeMesh(state, ["v1", "v2"])) as client:
        result = demo.step_canary_split(state, client, "t", requests=100)
    assert not result.ok and result.details["v2_share"] == pytest.approx(0.5)


def test_missing_copies_fail_the_mirror_step(tmp_path: Path) -> None:
    state = mesh_state(tmp_path)
    fake = FakeMesh(state, ["v1"])
    with client_for(fake) as client:
        split = demo.step_canary_split(state, client, "t", requests=40, weights=(100, 0))
        fake.shadow -= 3  # three copies never arrived
        mirror = demo.step_mirror(
            state,
            client,
            primaries=split.details["observation"],
            shadow_before=split.details["shadow_before"],
            orders_before=split.details["orders_before"],
            timeout=0.3,
        )
    assert split.ok  # (100, 0): the file is rewritten first, and every request went to v1
    assert not mirror.ok and mirror.details["mirrored"] == 37


def test_hot_reload_step_edits_the_file_and_waits_for_the_reload(tmp_path: Path) -> None:
    state = mesh_state(tmp_path)
    fake = FakeMesh(state, ["v1", "v2"])
    with client_for(fake) as client:
        result = demo.step_hot_reload(state, client, "t", requests=100)
    assert result.ok, result.summary
    assert canary_weights(Path(state.canary_file).read_text()) == {"v1": 50, "v2": 50}
    assert result.details["weights_before"] == {"v1": 90, "v2": 10} and fake.reloads["ok"] == 4
    assert not list(Path(state.run_dir).glob(".*.new"))  # the staging file was renamed into place


def test_a_rejected_or_missing_reload_is_reported(tmp_path: Path) -> None:
    state = mesh_state(tmp_path)
    rejected = FakeMesh(state, ["v1"], reload_result="error")
    with client_for(rejected) as client, pytest.raises(DependencyError, match="rejected"):
        demo.set_canary_weights(state, 50, 50, client=client, timeout=2)
    silent = FakeMesh(state, ["v1"])
    silent.reload_enabled = False
    late = r"did not reload .*orders-virtualservice.yaml within 0.3s"
    with client_for(silent) as client, pytest.raises(DependencyError, match=late):
        demo.set_canary_weights(state, 70, 30, client=client, timeout=0.3)


def test_split_observation_all_ok_needs_every_reply_from_orders() -> None:
    good = demo.SplitObservation(3, {"v1": 2, "v2": 1}, {200: 3}, {"orders": 3})
    assert good.all_ok and good.share("v2") == pytest.approx(1 / 3)
    assert not demo.SplitObservation(3, {"v1": 2}, {200: 2, 502: 1}, {"orders": 2}).all_ok
    assert not demo.SplitObservation(2, {"v1": 1}, {200: 2}, {"orders": 1, "orders-shadow": 1}).all_ok


def test_the_demo_command_bounds_the_canary_requests() -> None:
    parser = argparse.ArgumentParser()
    launcher_cli.register(parser.add_subparsers())
    assert parser.parse_args(["demo", "--canary-requests", "50"]).canary_requests == 50
    assert parser.parse_args(["demo"]).canary_requests == demo.CANARY_REQUESTS
    for bad in ("5", "100000"):
        with pytest.raises(SystemExit):
            parser.parse_args(["demo", "--canary-requests", bad])


def test_state_from_before_the_canary_still_loads(tmp_path: Path) -> None:
    data = json.loads(mesh_state(tmp_path).to_json())
    for key in ("canary_file", "frontend_proxy_admin_url", "app_urls"):
        del data[key]
    old = MeshState.from_json(json.dumps(data))
    assert old.canary_file == "" and old.app_urls == {}

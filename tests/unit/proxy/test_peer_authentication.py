"""PeerAuthentication composition (istiod ``ComposePeerAuthentication``), ``portLevelMtls`` included."""

from __future__ import annotations

import pytest

from authz.proxy.loader import parse_resources
from authz.proxy.model import PeerAuthentication
from authz.proxy.sidecar import peer_authentication_mode
from authz.request import Workload
from authz.resources import parse_documents

WL = Workload(namespace="shop", labels={"app": "web"})
ROOT = "istio-system"


def pa(
    name: str,
    ns: str,
    mode: str,
    selector: dict[str, str] | None = None,
    ports: dict[int, str] | None = None,
) -> PeerAuthentication:
    return PeerAuthentication(name, ns, selector, mode, ports or {})  # type: ignore[arg-type]


def mode(*policies: PeerAuthentication, port: int | None = 8080) -> str:
    return peer_authentication_mode(policies, WL, root_namespace=ROOT, port=port)


def test_port_level_overrides_the_workload_mode_for_that_port_only() -> None:
    w = pa("w", "shop", "STRICT", {"app": "web"}, {8080: "DISABLE", 9090: "PERMISSIVE"})
    assert mode(w, port=8080) == "DISABLE"
    assert mode(w, port=9090) == "PERMISSIVE"
    assert mode(w, port=7070) == "STRICT"
    assert mode(w, port=None) == "STRICT"


def test_port_level_unset_inherits_the_composed_mode() -> None:
    mesh = pa("m", ROOT, "STRICT")
    ns = pa("n", "shop", "DISABLE")
    w = pa("w", "shop", "UNSET", {"app": "web"}, {8080: "UNSET"})
    assert mode(mesh, w) == "STRICT"
    assert mode(mesh, ns, w) == "DISABLE"


def test_port_level_of_a_policy_without_selector_is_ignored() -> None:
    ns = pa("n", "shop", "STRICT", None, {8080: "DISABLE"})
    mesh = pa("m", ROOT, "STRICT", None, {8080: "DISABLE"})
    assert mode(ns) == "STRICT"
    assert mode(mesh) == "STRICT"


def test_port_level_of_a_policy_selecting_another_workload_is_ignored() -> None:
    other = pa("o", "shop", "STRICT", {"app": "db"}, {8080: "DISABLE"})
    assert mode(pa("m", ROOT, "STRICT"), other) == "STRICT"


def test_only_the_first_workload_policy_counts() -> None:
    """istiod uses one workload-level policy (the oldest; here the first by name), not a merge."""
    a = pa("a", "shop", "UNSET", {"app": "web"})
    b = pa("b", "shop", "DISABLE", {"app": "web"}, {8080: "DISABLE"})
    assert mode(pa("m", ROOT, "STRICT"), a, b) == "STRICT"


def test_nothing_set_is_permissive() -> None:
    assert mode() == "PERMISSIVE"
    assert mode(pa("m", ROOT, "UNSET")) == "PERMISSIVE"


@pytest.mark.parametrize("port_mode", ["DISABLE", "PERMISSIVE", "STRICT", "UNSET"])
def test_loader_reads_port_level_mtls(port_mode: str) -> None:
    text = f"""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: w, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls:
    8080: {{mode: {port_mode}}}
"""
    (policy,) = parse_resources(parse_documents(text, "t.yaml")).mesh.peer_authentications
    assert policy.port_level == {8080: port_mode}
    assert mode(policy) == ("STRICT" if port_mode == "UNSET" else port_mode)

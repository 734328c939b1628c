"""Istio YAML -> model: Istio's defaults, and errors that name file:line:field."""

from __future__ import annotations

import pytest

from authz.errors import ConfigErrors
from authz.proxy.loader import DEFAULT_RETRY_POLICY, fqdn, parse_duration, parse_resources
from authz.proxy.settings import SidecarConfig
from authz.resources import parse_documents


def load(text: str) -> SidecarConfig:
    return parse_resources(parse_documents(text, "mesh.yaml"))


VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [reviews]
  http:
"""


def test_istio_defaults() -> None:
    cfg = load(
        VS + "  - route:\n    - destination: {host: reviews}\n    mirror: {host: shadow}\n"
        "    fault: {abort: {httpStatus: 500}, delay: {fixedDelay: 1s}}\n"
    )
    vs = cfg.mesh.virtual_services[0]
    assert vs.hosts == ("reviews.shop.svc.cluster.local",)
    route = vs.http[0]
    assert route.destinations[0].host == "reviews.shop.svc.cluster.local"
    assert route.destinations[0].weight == 100  # a single destination gets all the traffic
    assert route.timeout is None  # Istio disables the route timeout
    assert route.retries == DEFAULT_RETRY_POLICY  # 2 retries, connect-failure,refused-stream,...
    assert route.mirrors[0].percent == 100.0  # absent mirrorPercentage = 100%
    assert route.fault is not None
    assert (route.fault.abort_percent, route.fault.delay_percent) == (0.0, 0.0)  # no percentage => no fault


def test_retries_attempts_zero_disables_and_retry_on_codes() -> None:
    cfg = load(
        VS + "  - route: [{destination: {host: a}}]\n    retries: {attempts: 0}\n"
        "  - route: [{destination: {host: a}}]\n"
        "    retries: {attempts: 3, retryOn: '503,reset', perTryTimeout: 250ms}\n"
    )
    r0, r1 = cfg.mesh.virtual_services[0].http
    assert r0.retries is None
    assert r1.retries is not None
    assert r1.retries.status_codes == {503}
    assert r1.retries.retry_on == {"reset", "retriable-status-codes"}
    assert r1.retries.per_try_timeout == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("snippet", "line", "field"),
    [
        ("  - route: [{destination: {host: a}}]\n    timeout: soon\n", 8, "spec.http[0].timeout"),
        (
            "  - route: [{destination: {host: a}}]\n    retries: {attempts: 2, retryOn: 'sometimes'}\n",
            8,
            "spec.http[0].retries.retryOn",
        ),
        (
            "  - match:\n    - uri: {regex: '('}\n    route: [{destination: {host: a}}]\n",
            8,
            "spec.http[0].match[0].uri.regex",
        ),
        (
            "  - match:\n    - uri: {exact: /a, prefix: /b}\n    route: [{destination: {host: a}}]\n",
            8,
            "spec.http[0].match[0].uri",
        ),
        ("  - route: []\n", 7, "spec.http[0].route"),
        ("  - route: [{destination: {host: a}, weight: 0}]\n", 7, "spec.http[0].route"),
        (
            "  - route: [{destination: {host: a}}]\n    headers: {request: {set: {'bad name': x}}}\n",
            8,
            "spec.http[0].headers.request.set.bad name",
        ),
    ],
)
def test_errors_name_file_line_and_field(snippet: str, line: int, field: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        load(VS + snippet)
    err = info.value.errors[0]
    assert (err.file, err.field) == ("mesh.yaml", field)
    assert err.line == line
    assert str(err).startswith(f"mesh.yaml:{line}: {field}: ")


def test_all_errors_are_collected() -> None:
    with pytest.raises(ConfigErrors) as info:
        load(VS + "  - route: [{destination: {host: a}}]\n    timeout: x\n    retries: {attempts: -1}\n")
    assert len(info.value.errors) == 2


def test_destination_rule_subset_policy_overrides_top_level() -> None:
    cfg = load("""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: RANDOM}}
""")
    dr = cfg.mesh.destination_rules[0]
    merged = dr.subsets[0].traffic_policy.merged_over(dr.traffic_policy)
    assert merged.load_balancer is not None and merged.load_balancer.simple == "RANDOM"
    assert merged.tls is not None and merged.tls.mode == "ISTIO_MUTUAL"


def test_source_labels_filter_rules_for_this_sidecar() -> None:
    proxy = """apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {name: p, namespace: shop}
spec:
  workload: {labels: {app: web}}
---
"""
    cfg = load(
        proxy + VS + "  - match: [{sourceLabels: {app: other}}]\n    route: [{destination: {host: a}}]\n"
        "  - route: [{destination: {host: b}}]\n"
    )
    assert [r.destinations[0].host for r in cfg.mesh.virtual_services[0].http] == ["b.shop.svc.cluster.local"]
    assert cfg.settings.labels == {"app": "web"}


def test_virtual_service_bound_to_gateways_only_is_ignored_by_sidecars() -> None:
    cfg = load(
        VS.replace("  http:\n", "  gateways: [ingress]\n  http:\n")
        + "  - route: [{destination: {host: a}}]\n"
    )
    assert cfg.mesh.virtual_services[0].http == ()


@pytest.mark.parametrize(
    ("text", "seconds"), [("1s", 1.0), ("250ms", 0.25), ("1m30s", 90.0), ("1.5h", 5400.0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1x", "-1s", "1s2"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_fqdn() -> None:
    assert fqdn("Reviews", "ns") == "reviews.ns.svc.cluster.local"
    assert fqdn("api.example.com", "ns") == "api.example.com"
    assert fqdn("*.example.com", "ns") == "*.example.com"


def test_shipped_example_loads() -> None:
    from pathlib import Path

    from authz.proxy.loader import load_sidecar_config

    root = Path(__file__).resolve().parents[3] / "examples" / "proxy"
    cfg = load_sidecar_config(root / "sidecar.yaml")
    assert cfg.settings.spiffe_id == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert cfg.settings.identity is not None and cfg.settings.identity.cert.endswith(
        "certs/frontend/cert.pem"
    )
    assert [vs.name for vs in cfg.mesh.virtual_services] == ["reviews"]
    canary = cfg.mesh.virtual_services[0].http[1]
    assert [d.weight for d in canary.destinations] == [90, 10]
    assert canary.mirrors[0].percent == 5.0
    assert cfg.mesh.peer_authentications[0].mode == "STRICT"
    assert cfg.settings.path_normalization.name == "BASE"
    assert cfg.settings.client_cert.forward == "SANITIZE_SET"


def test_proxy_config_with_another_api_version_is_an_error_not_ignored() -> None:
    from authz.errors import ConfigErrors
    from authz.proxy.loader import parse_resources
    from authz.resources import parse_documents

    text = "apiVersion: proxy.example/v9\nkind: ProxyConfig\nmetadata: {name: p}\nspec: {}\n"
    with pytest.raises(ConfigErrors) as info:
        parse_resources(parse_documents(text, "p.yaml"))
    assert "p.yaml:1: apiVersion: ProxyConfig" in str(info.value.errors[0])

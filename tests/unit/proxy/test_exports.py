"""The proxy package's public names are exactly the intended ones."""

from __future__ import annotations

import importlib

import pytest

import authz.proxy

MODULES = [
    "authz_client",
    "cli",
    "cluster",
    "http1",
    "lb",
    "listener",
    "loader",
    "local_reply",
    "message",
    "metrics",
    "mirror",
    "model",
    "mtls",
    "origination",
    "outlier",
    "paths",
    "pool",
    "retry",
    "router",
    "settings",
    "sidecar",
    "telemetry",
    "xfcc",
]


def test_package_exports() -> None:
    assert sorted(authz.proxy.__all__) == [
        "AllowAll",
        "Authorizer",
        "GrpcAuthorizer",
        "ProxySettings",
        "Sidecar",
        "SidecarConfig",
        "load_sidecar_config",
        "parse_resources",
    ]


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_all_and_it_resolves(name: str) -> None:
    module = importlib.import_module(f"authz.proxy.{name}")
    assert module.__all__, name
    for symbol in module.__all__:
        assert hasattr(module, symbol), f"{name}.{symbol}"


def test_proxy_imports_only_shared_values_and_siblings() -> None:
    """STYLE.md import direction: proxy depends on shared values (and the engine via a protocol), not on
    the other fronts or the policy/authn internals."""
    import ast
    from pathlib import Path

    allowed = (
        "authz.proxy",
        "authz.errors",
        "authz.request",
        "authz.decision",
        "authz.clock",
        "authz.resources",
        "authz.workload",
        "authz.engine",
        "authz.runtime",
        "authz.eventloop",
        "authz.loop_metrics",  # lock-free counters for per-request metrics (a utility, no policy logic)
        "authz.config",  # a shared value (PathNormalization, meshConfig's enum)
        # Envoy's HCM path normalization: the proxy forwards exactly the path the engine matches policies
        # against, so both must use this one implementation (a pure function, no policy internals).
        "authz.policy.normalize",
        "authz.native",  # which build of the per-request modules runs (compiled or source): logged
    )
    for path in Path(authz.proxy.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("authz"):
                assert node.module.startswith(allowed), f"{path.name} imports {node.module}"

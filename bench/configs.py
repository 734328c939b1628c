"""Configuration for every process of a bench run, as plain data: Envoy bootstraps, Istio policy YAML,
the bundled proxy's ``ProxyConfig``. Pure functions; :mod:`bench.rows` writes them to a temp dir.

One rule, said three ways (so every row decides the same request the same way):
"a valid RS256 JWT from ``BENCH_ISSUER`` is required for ``sub == BENCH_SUBJECT`` with ``groups``
containing ``BENCH_GROUP``, on paths under ``/api/``":

* Envoy native: ``jwt_authn`` (provider ``requires_any(provider, allow_missing)``, as istiod generates it,
  istio ``pilot/pkg/security/authn/policy_applier.go``) then ``rbac`` on the payload metadata;
* Istio YAML: a ``RequestAuthentication`` with an inline ``jwks`` and an ``AuthorizationPolicy`` with
  ``requestPrincipals``, ``paths`` and a ``request.auth.claims[groups]`` condition (spec istio-authz §1, §3).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import yaml

from authz.envoy.bootstrap import SidecarSpec, sidecar_bootstrap
from bench.tokens import BENCH_GROUP, BENCH_ISSUER, BENCH_SUBJECT

__all__ = [
    "BENCH_LABELS",
    "BENCH_NAMESPACE",
    "BENCH_PATH",
    "DEFAULT_JWT_CACHE_SIZE",
    "ROUTER_FILTER",
    "bench_policy_yaml",
    "ext_authz_bootstrap",
    "jwt_authn_filter",
    "native_auth_bootstrap",
    "plain_proxy_bootstrap",
    "proxy_config_yaml",
    "rbac_filter",
    "upstream_bootstrap",
]

BENCH_PATH = "/api/items"
BENCH_PATH_PATTERN = "/api/*"
BENCH_NAMESPACE = "default"
BENCH_LABELS = {"app": "bench"}
# Envoy's jwt_cache_config default is 100 entries (jwt_authn config.proto JwtCacheConfig); row 2b uses it.
DEFAULT_JWT_CACHE_SIZE = 100
UPSTREAM_BODY = "ok\n"

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
JWT_AUTHN_FILTER_NAME = "envoy.filters.http.jwt_authn"
ROUTER_FILTER: dict[str, Any] = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def upstream_bootstrap() -> dict[str, Any]:
    """The upstream of every proxy row: an Envoy answering ``200 ok`` from a ``direct_response`` route.

    Listener and admin on port 0 (the runner reads the bound ports from the admin API).
    """
    hcm = {
        "@type": HCM,
        "stat_prefix": "upstream",
        "codec_type": "AUTO",
        "route_config": {
            "name": "upstream",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": UPSTREAM_BODY}},
                        }
                    ],
                }
            ],
        },
        "http_filters": [ROUTER_FILTER],
    }
    return {
        "admin": {"address": _address(0)},
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": _address(0),
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


def ext_authz_bootstrap(
    mode: Literal["grpc", "http"], *, upstream_port: int, authz_port: int
) -> dict[str, Any]:
    """Row 3: the project's own sidecar bootstrap (``authz.envoy.sidecar_bootstrap``), ports patched."""
    return sidecar_bootstrap(
        SidecarSpec(
            listen_port=0,
            admin_port=0,
            app_host="127.0.0.1",
            app_port=upstream_port,
            authz_host="127.0.0.1",
            authz_port=authz_port,
            mode=mode,
            namespace=BENCH_NAMESPACE,
            labels=dict(BENCH_LABELS),
        )
    )


def _with_filters(upstream_port: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
    """The sidecar bootstrap (same listener, HCM settings and app cluster as row 3) with the ext_authz
    filter, its per-route config and its cluster replaced by ``filters`` + the router."""
    boot = copy.deepcopy(ext_authz_bootstrap("grpc", upstream_port=upstream_port, authz_port=1))
    resources = boot["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != "meshauthz"]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [*filters, ROUTER_FILTER]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            route.pop("typed_per_filter_config", None)
    return boot


def plain_proxy_bootstrap(upstream_port: int) -> dict[str, Any]:
    """Row 1: Envoy proxying to the upstream with no auth at all (the floor)."""
    return _with_filters(upstream_port, [])


def jwt_authn_filter(jwks: str, *, cache_size: int | None) -> dict[str, Any]:
    """Envoy ``jwt_authn`` as istiod writes it for one ``jwtRules`` entry (policy_applier.go
    ``convertToEnvoyJwtConfig``): provider ``origins-0``, inline JWKS, payload in metadata under the
    issuer, token not forwarded, ``requires_any(provider, allow_missing)``, CORS preflight bypass.
    ``cache_size`` adds ``jwt_cache_config`` (Istio leaves it out)."""
    provider: dict[str, Any] = {
        "issuer": BENCH_ISSUER,
        "local_jwks": {"inline_string": jwks},
        "forward": False,
        "payload_in_metadata": BENCH_ISSUER,
        "normalize_payload_in_metadata": {"space_delimited_claims": ["scope", "permission"]},
    }
    if cache_size is not None:
        provider["jwt_cache_config"] = {"jwt_cache_size": cache_size}
    return {
        "name": JWT_AUTHN_FILTER_NAME,
        "typed_config": {
            "@type": JWT_AUTHN,
            "providers": {"origins-0": provider},
            "rules": [
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {
                            "requirements": [{"provider_name": "origins-0"}, {"allow_missing": {}}]
                        }
                    },
                }
            ],
            "bypass_cors_preflight": True,
        },
    }


def _payload_matcher(claim: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "filter": JWT_AUTHN_FILTER_NAME,
            "path": [{"key": BENCH_ISSUER}, {"key": claim}],
            "value": value,
        }
    }


def rbac_filter() -> dict[str, Any]:
    """Envoy ``rbac`` ALLOW equivalent to the bench AuthorizationPolicy: ``paths: [/api/*]`` is a
    ``url_path`` prefix (istio ``matcher/header.go`` PathMatcher); ``requestPrincipals: [iss/sub]`` is
    iss and sub exact; ``request.auth.claims[groups]`` is a list ``one_of`` (istio ``generator.go``)."""
    principal = {
        "and_ids": {
            "ids": [
                _payload_matcher("iss", {"string_match": {"exact": BENCH_ISSUER}}),
                _payload_matcher("sub", {"string_match": {"exact": BENCH_SUBJECT}}),
                _payload_matcher(
                    "groups", {"list_match": {"one_of": {"string_match": {"exact": BENCH_GROUP}}}}
                ),
            ]
        }
    }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": RBAC,
            "rules": {
                "action": "ALLOW",
                "policies": {
                    f"ns[{BENCH_NAMESPACE}]-policy[bench]-rule[0]": {
                        "permissions": [{"url_path": {"path": {"prefix": BENCH_PATH_PATTERN[:-1]}}}],
                        "principals": [principal],
                    }
                },
            },
        },
    }


def native_auth_bootstrap(upstream_port: int, jwks: str, *, cache_size: int | None) -> dict[str, Any]:
    """Row 2a (``cache_size=None``, as Istio configures it) and 2b (``jwt_cache_config``)."""
    return _with_filters(upstream_port, [jwt_authn_filter(jwks, cache_size=cache_size), rbac_filter()])


def bench_policy_yaml(jwks: str) -> str:
    """The Istio policy folder's one file: RequestAuthentication (inline ``jwks``) + AuthorizationPolicy."""
    selector = {"matchLabels": dict(BENCH_LABELS)}
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "bench", "namespace": BENCH_NAMESPACE},
            "spec": {"selector": selector, "jwtRules": [{"issuer": BENCH_ISSUER, "jwks": jwks}]},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "bench", "namespace": BENCH_NAMESPACE},
            "spec": {
                "selector": selector,
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"requestPrincipals": [f"{BENCH_ISSUER}/{BENCH_SUBJECT}"]}}],
                        "to": [{"operation": {"paths": [BENCH_PATH_PATTERN]}}],
                        "when": [{"key": "request.auth.claims[groups]", "values": [BENCH_GROUP]}],
                    }
                ],
            },
        },
    ]
    return yaml.safe_dump_all(docs, sort_keys=False, width=1 << 16)


def proxy_config_yaml(
    *,
    inbound_port: int,
    admin_port: int,
    upstream_port: int,
    policy_dir: str | None,
) -> str:
    """The bundled proxy's ``ProxyConfig`` (``meshauthz.dev/v1alpha1``, see ``authz/proxy/loader.py``):
    inbound listener to the upstream, in-process authorization from ``policy_dir`` (``None``: no auth)."""
    authorizer: dict[str, Any] = {"mode": "none"}
    if policy_dir is not None:
        authorizer = {"mode": "local", "policies": [policy_dir]}
    doc = {
        "apiVersion": "meshauthz.dev/v1alpha1",
        "kind": "ProxyConfig",
        "metadata": {"name": "bench", "namespace": BENCH_NAMESPACE},
        "spec": {
            "workload": {"namespace": BENCH_NAMESPACE, "labels": dict(BENCH_LABELS)},
            "inbound": {
                "address": "127.0.0.1",
                "port": inbound_port,
                "appAddress": "127.0.0.1",
                "appPort": upstream_port,
            },
            "admin": {"address": "127.0.0.1", "port": admin_port},
            "authorizer": authorizer,
            "accessLog": False,
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)

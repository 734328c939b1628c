"""A complete Envoy v3 bootstrap for a sidecar whose ext_authz filter calls meshauthz.

Inbound listener (optionally mTLS with an SVID, client certificate required, peer URI SAN available as
``source.principal``), the ``ext_authz`` filter in gRPC or HTTP mode with ``include_peer_certificate``,
per-route ``context_extensions`` naming the workload (gRPC) or ``x-authz-*`` headers (HTTP), the local
app as upstream, admin on loopback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["SidecarSpec", "TlsFiles", "sidecar_bootstrap"]

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
EXT_AUTHZ_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_PROTOCOL_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"

# Envoy multiplexes every check of one Envoy worker on one HTTP/2 connection; capping concurrent streams
# makes it open more connections, which SO_REUSEPORT then spreads over the authorizer's worker processes.
# At 1 (a connection per in-flight check) two workers took 30-70% each (tests/integration/test_server_ops.py);
# at 4, one of them got only 5-13%, as Envoy fills its first connection before opening another.
DEFAULT_AUTHZ_MAX_CONCURRENT_STREAMS = 1
# Prefix of every x-authz-* value Envoy sets in HTTP mode (see authz.server.http_ext_authz).
TRUSTED_VALUE_MARKER = "+"


@dataclass(frozen=True)
class TlsFiles:
    cert_chain: str
    private_key: str
    trusted_ca: str
    require_client_certificate: bool = True


@dataclass(frozen=True)
class SidecarSpec:
    listen_port: int = 0
    app_host: str = "127.0.0.1"
    app_port: int = 8080
    authz_host: str = "127.0.0.1"
    authz_port: int = 9191
    mode: Literal["grpc", "http"] = "grpc"
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    tls: TlsFiles | None = None
    admin_port: int = 0
    failure_mode_allow: bool = False
    status_on_error: int = 403
    timeout: str = "1s"
    path_normalization: Literal["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"] = "BASE"
    forward_headers_prefix: str = "x-"
    """HTTP mode: response headers with this prefix are copied to the upstream request on allow."""


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(
    name: str, host: str, port: int, *, http2: bool, max_streams: int | None = None
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}],
        },
    }
    if http2:
        h2: dict[str, Any] = {}
        if max_streams:
            h2["max_concurrent_streams"] = max_streams
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": h2},
            }
        }
    return cluster


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _ext_authz_filter(spec: SidecarSpec) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "@type": EXT_AUTHZ,
        "transport_api_version": "V3",
        "failure_mode_allow": spec.failure_mode_allow,
        "status_on_error": {"code": spec.status_on_error},
        "include_peer_certificate": True,
        "include_tls_session": True,
    }
    if spec.mode == "grpc":
        cfg["grpc_service"] = {"envoy_grpc": {"cluster_name": "meshauthz"}, "timeout": spec.timeout}
    else:
        # Facts the client must not choose ride in headers Envoy sets itself (they override client values).
        trusted = [
            ("x-authz-source-principal", "%DOWNSTREAM_PEER_URI_SAN%"),
            ("x-authz-source-address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
            ("x-authz-destination-address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
            ("x-authz-destination-principal", "%DOWNSTREAM_LOCAL_URI_SAN%"),
            ("x-authz-peer-certificate", "%DOWNSTREAM_PEER_CERT%"),
            ("x-authz-sni", "%REQUESTED_SERVER_NAME%"),
            ("x-authz-namespace", spec.namespace),
            ("x-authz-labels", _labels_text(spec.labels)),
        ]
        cfg["http_service"] = {
            "server_uri": {
                "uri": f"http://{spec.authz_host}:{spec.authz_port}",
                "cluster": "meshauthz",
                "timeout": spec.timeout,
            },
            "authorization_request": {
                # Envoy skips a header whose formatted value is empty, which would let a client's own copy
                # through; the "+" marker keeps every value non-empty, so Envoy's always overrides.
                "headers_to_add": [{"key": k, "value": TRUSTED_VALUE_MARKER + v} for k, v in trusted],
            },
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"prefix": spec.forward_headers_prefix}]},
                "allowed_client_headers": {
                    "patterns": [
                        {"exact": "www-authenticate"},
                        {"exact": "content-type"},
                        {"exact": "x-authz-decision-id"},
                    ]
                },
            },
        }
        # Every request header goes to the authorizer: policies may match any of them.
        cfg["allowed_headers"] = {"patterns": [{"safe_regex": {"regex": ".*"}}]}
    return cfg


def _per_route(spec: SidecarSpec) -> dict[str, Any]:
    ext = {"namespace": spec.namespace}
    if spec.labels:
        ext["labels"] = _labels_text(spec.labels)
    return {"@type": EXT_AUTHZ_PER_ROUTE, "check_settings": {"context_extensions": ext}}


def sidecar_bootstrap(spec: SidecarSpec) -> dict[str, Any]:
    """The bootstrap as plain data (YAML/JSON-ready); ``envoy --mode validate`` accepts it."""
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": "inbound",
        "codec_type": "AUTO",
        "normalize_path": spec.path_normalization != "NONE",
        "merge_slashes": spec.path_normalization in ("MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"),
        "path_with_escaped_slashes_action": (
            "UNESCAPE_AND_FORWARD"
            if spec.path_normalization == "DECODE_AND_MERGE_SLASHES"
            else "KEEP_UNCHANGED"
        ),
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"uri": True, "cert": False},
        "route_config": {
            "name": "inbound",
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "app", "timeout": "15s"},
                            "typed_per_filter_config": {"envoy.filters.http.ext_authz": _per_route(spec)},
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_authz", "typed_config": _ext_authz_filter(spec)},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
        ],
    }
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if spec.tls is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": DOWNSTREAM_TLS,
                "require_client_certificate": spec.tls.require_client_certificate,
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": spec.tls.cert_chain},
                            "private_key": {"filename": spec.tls.private_key},
                        }
                    ],
                    "validation_context": {"trusted_ca": {"filename": spec.tls.trusted_ca}},
                    "alpn_protocols": ["h2", "http/1.1"],
                },
            },
        }
    return {
        "admin": {"address": _socket("127.0.0.1", spec.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _socket("127.0.0.1", spec.listen_port),
                    "filter_chains": [chain],
                }
            ],
            "clusters": [
                _cluster("app", spec.app_host, spec.app_port, http2=False),
                _cluster(
                    "meshauthz",
                    spec.authz_host,
                    spec.authz_port,
                    http2=spec.mode == "grpc",
                    max_streams=DEFAULT_AUTHZ_MAX_CONCURRENT_STREAMS if spec.mode == "grpc" else None,
                ),
            ],
        },
    }

"""A request described in YAML/JSON (for ``authz check`` and policy test cases) -> request values.

Format (every key optional)::

    method: GET                # HTTP; `tcp: true` makes a TCP (network filter) request
    host: orders.example.com
    path: /orders?limit=10     # raw :path, normalized by the caller per meshConfig
    headers: {x-tenant: acme}  # names are lower-cased, list values joined with ","
    source: {principal: spiffe://cluster.local/ns/web/sa/frontend, ip: 10.1.2.3}
    remoteIp: 203.0.113.7      # remote.ip (defaults to source.ip)
    destination: {ip: 10.0.0.9, port: 8080}
    sni: outbound_.8080_._.orders.svc.cluster.local
    workload: {namespace: orders, labels: {app: orders}}
    claims: {iss: https://idp.example.com, sub: alice, scope: "read write"}   # verified JWT payload
    token: eyJhbGciOi...       # a raw JWT, sent as `Authorization: Bearer`; `authz check` validates it
    spaceDelimitedClaims: [custom_scope]
    metadata: {envoy.filters.http.foo: {key: value}}

Flat aliases: ``principal``/``sourcePrincipal``, ``sourceIp``, ``port``/``destinationPort``,
``namespace``, ``labels``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authz.errors import ConfigError
from authz.request import HttpAttributes, Peer, Request, RequestAuth, Workload

__all__ = ["parse_request_file"]

_KNOWN = frozenset(
    {
        "method", "host", "path", "headers", "scheme", "protocol", "tcp", "source", "remoteIp",
        "destination", "sni", "workload", "claims", "spaceDelimitedClaims", "metadata", "principal", "token",
        "sourcePrincipal", "sourceIp", "port", "destinationPort", "namespace", "labels",
    }
)  # fmt: skip


def _str(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError("must be a string", field=key)
    return str(value)


def _port(value: Any, field: str) -> int:
    if value is None:
        return 0
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError("must be a port number", field=field) from None
    if not 0 <= port <= 65535 or isinstance(value, bool):
        raise ConfigError("must be a port number in 0-65535", field=field)
    return port


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError("must be a mapping", field=key)
    return value


def parse_request_file(data: Any) -> tuple[Request, Workload, RequestAuth | None]:
    """Build the request, the destination workload and the verified credential (if ``claims``).

    Raises :class:`ConfigError` naming the offending field.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("a request must be a mapping")
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise ConfigError(f"unknown field(s): {', '.join(map(str, unknown))}", field=str(unknown[0]))
    source = _mapping(data, "source")
    dest = _mapping(data, "destination")
    wl = _mapping(data, "workload")
    headers_raw = _mapping(data, "headers")
    headers: dict[str, str] = {}
    for name, value in headers_raw.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in values):
            raise ConfigError("header values must be strings", field=f"headers.{name}")
        key = str(name).lower()
        joined = ",".join(str(v) for v in values)
        headers[key] = f"{headers[key]},{joined}" if key in headers else joined
    token = _str(data, "token")
    if token and "authorization" not in headers:
        headers["authorization"] = f"Bearer {token}"
    tcp = data.get("tcp", False)
    if not isinstance(tcp, bool):
        raise ConfigError("must be true or false", field="tcp")
    http = None
    if not tcp:
        http = HttpAttributes(
            method=_str(data, "method", "GET"),
            host=_str(data, "host"),
            path=_str(data, "path", "/"),
            scheme=_str(data, "scheme", "http"),
            protocol=_str(data, "protocol", "HTTP/1.1"),
            headers=headers,
        )
    principal = _str(source, "principal") or _str(data, "principal") or _str(data, "sourcePrincipal")
    source_ip = _str(source, "ip") or _str(source, "address") or _str(data, "sourceIp")
    port = _port(dest.get("port", data.get("port", data.get("destinationPort"))), "destination.port")
    metadata = _mapping(data, "metadata")
    request = Request(
        source=Peer(address=source_ip, port=_port(source.get("port"), "source.port"), principal=principal),
        destination=Peer(address=_str(dest, "ip") or _str(dest, "address"), port=port),
        http=http,
        sni=_str(data, "sni"),
        metadata=dict(metadata),
        remote_ip=_str(data, "remoteIp") or source_ip,
    )
    labels = wl.get("labels", data.get("labels")) or {}
    if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
        raise ConfigError("must map strings to strings", field="workload.labels")
    workload = Workload(
        namespace=_str(wl, "namespace") or _str(data, "namespace") or "default",
        labels={str(k): v for k, v in labels.items()},
    )
    auth = None
    if data.get("claims") is not None:
        claims = data["claims"]
        if not isinstance(claims, Mapping):
            raise ConfigError("must be a mapping (the verified JWT payload)", field="claims")
        extra = data.get("spaceDelimitedClaims") or []
        if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
            raise ConfigError("must be a list of claim names", field="spaceDelimitedClaims")
        auth = RequestAuth(claims=dict(claims), space_delimited=frozenset({"scope", "permission", *extra}))
    return request, workload, auth

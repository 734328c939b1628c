"""``authz envoy-config``: write a complete Envoy sidecar bootstrap whose ext_authz filter calls meshauthz.

    authz envoy-config [--mode grpc|http] [--authz HOST:PORT] [--app HOST:PORT] [--listen HOST:PORT]
                       [--admin-port N] [--namespace NS] [--labels k=v,...] [--svid DIR] [--out FILE]

The bootstrap comes from :func:`authz.envoy.sidecar_bootstrap`; before it is written it is parsed into the
typed ``envoy.config.bootstrap.v3.Bootstrap`` message of the ``envoy-data-plane`` package, so every field
name and type is checked against Envoy's own protos (an unknown field or a string where a number belongs
fails here, with the field named, not later inside Envoy), and what is written is that typed message's
canonical proto3 JSON mapping. ``envoy-data-plane`` is imported only inside this command: nothing on a
request path loads it.

Exit codes: 0 written; 1 refused (invalid flags, typed check failed, file not writable); 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from authz.envoy.bootstrap import SidecarSpec, TlsFiles, sidecar_bootstrap
from authz.errors import ConfigError
from authz.workload import parse_labels

__all__ = [
    "DEFAULT_AUTHZ_GRPC",
    "DEFAULT_AUTHZ_HTTP",
    "EXIT_ERROR",
    "EXIT_OK",
    "INSTALL_HINT",
    "SVID_FILES",
    "check_typed",
    "parse_hostport",
    "register",
    "render",
    "spec_from_args",
    "typed_bootstrap",
    "with_listener_host",
]

EXIT_OK = 0
EXIT_ERROR = 1

# The authorizer's default ports (README "Plugging into Envoy"): gRPC ext_authz 9191, HTTP ext_authz 9192.
DEFAULT_AUTHZ_GRPC = "127.0.0.1:9191"
DEFAULT_AUTHZ_HTTP = "127.0.0.1:9192"
INSTALL_HINT = "pip install envoy-data-plane"
# The files `authz ca issue` writes (authz.identity.ca.write_svid): Envoy presents the chain (leaf first)
# and trusts the bundle (the trust domain's roots).
SVID_FILES = {"cert_chain": "chain.pem", "private_key": "key.pem", "trusted_ca": "bundle.pem"}
# Envoy's JSON/YAML config loader takes proto3 JSON: type URLs name the message, the package before the
# last dot is the python module of envoy-data-plane that registers it.
_TYPE_URL_PREFIX = "type.googleapis.com/"
_TYPED_PACKAGE = "envoy_data_plane"


def parse_hostport(text: str, *, field: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` or ``:PORT`` (loopback) -> (host, port); port 0..65535."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}", field=field, reason="invalid_address")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def spec_from_args(args: argparse.Namespace) -> SidecarSpec:
    """The :class:`SidecarSpec` the flags describe (pure: reads no file)."""
    authz_addr = args.authz or (DEFAULT_AUTHZ_GRPC if args.mode == "grpc" else DEFAULT_AUTHZ_HTTP)
    authz_host, authz_port = parse_hostport(authz_addr, field="--authz")
    app_host, app_port = parse_hostport(args.app, field="--app")
    _, listen_port = parse_hostport(args.listen, field="--listen")
    tls = None
    if args.svid is not None:
        d = Path(args.svid)
        tls = TlsFiles(
            cert_chain=str(d / SVID_FILES["cert_chain"]),
            private_key=str(d / SVID_FILES["private_key"]),
            trusted_ca=str(d / SVID_FILES["trusted_ca"]),
            require_client_certificate=not args.optional_client_cert,
        )
    mode: Literal["grpc", "http"] = args.mode
    return SidecarSpec(
        listen_port=listen_port,
        app_host=app_host,
        app_port=app_port,
        authz_host=authz_host,
        authz_port=authz_port,
        mode=mode,
        namespace=args.namespace,
        labels=parse_labels(args.labels),
        tls=tls,
        admin_port=args.admin_port,
        failure_mode_allow=args.failure_mode_allow,
        timeout=args.timeout,
    )


def with_listener_host(bootstrap: dict[str, Any], host: str) -> dict[str, Any]:
    """Bind the inbound listener to ``host`` (``sidecar_bootstrap`` binds loopback; a container sidecar
    listens on ``0.0.0.0``), and resolve cluster endpoints that are host names by DNS: Envoy's ``STATIC``
    cluster takes IP literals only (envoy ``Cluster.DiscoveryType``), docker-compose gives service names.
    The admin listener stays on loopback."""
    out: dict[str, Any] = json.loads(json.dumps(bootstrap))
    resources = out["static_resources"]
    for listener in resources["listeners"]:
        listener["address"]["socket_address"]["address"] = host
    for cluster in resources["clusters"]:
        endpoints = cluster["load_assignment"]["endpoints"]
        hosts = [
            e["endpoint"]["address"]["socket_address"]["address"]
            for lb in endpoints
            for e in lb["lb_endpoints"]
        ]
        if not all(_is_ip(h) for h in hosts):
            cluster["type"] = "STRICT_DNS"
            cluster["dns_lookup_family"] = "V4_ONLY"
    return out


def _type_urls(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "@type" and isinstance(value, str):
                yield value
            else:
                yield from _type_urls(value)
    elif isinstance(node, list):
        for item in node:
            yield from _type_urls(item)


def _import_typed(package: str, url: str) -> Any:
    """Import (and so register) the envoy-data-plane module of a proto package.

    envoy-data-plane 2.2 declares pydantic validators in a form pydantic 2.12 deprecates: the warning is
    theirs, raised once at class definition, and says nothing about our configuration.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(f"{_TYPED_PACKAGE}.{package}")
    except ImportError as exc:
        if not url:
            raise ConfigError(
                f"the typed Envoy messages are missing: {INSTALL_HINT}", reason="missing_dependency"
            ) from exc
        raise ConfigError(f"unknown type {url}", field="@type", reason="invalid_envoy_config") from exc


def typed_bootstrap(bootstrap: Mapping[str, Any]) -> Any:
    """Parse ``bootstrap`` into the typed ``envoy.config.bootstrap.v3.Bootstrap`` (envoy-data-plane).

    Every ``google.protobuf.Any`` is unpacked into its typed message too (the module that defines each
    ``@type`` is imported first, which registers it). Raises :class:`ConfigError` (``invalid_envoy_config``)
    naming the unknown field, the wrong value, or the unknown type; ``missing_dependency`` if the
    package is not installed.
    """
    bootstrap_v3 = _import_typed("envoy.config.bootstrap.v3", "")
    for url in sorted(set(_type_urls(bootstrap))):
        if not url.startswith(_TYPE_URL_PREFIX):
            raise ConfigError(f"not a type URL: {url!r}", field="@type", reason="invalid_envoy_config")
        _import_typed(url.removeprefix(_TYPE_URL_PREFIX).rpartition(".")[0], url)
    try:
        return bootstrap_v3.Bootstrap.from_dict(dict(bootstrap))
    except (KeyError, ValueError, TypeError) as exc:
        # betterproto2 raises KeyError("Unknown field 'x' in message Y"), ValueError/TypeError on values.
        detail = exc.args[0] if exc.args else type(exc).__name__
        raise ConfigError(f"Envoy rejects the bootstrap: {detail}", reason="invalid_envoy_config") from exc


def _fail(message: str, field: str) -> ConfigError:
    return ConfigError(message, field=field, reason="invalid_envoy_config")


def _unpack(packed: Any) -> Any:
    """The message inside a ``google.protobuf.Any`` (its type is registered by :func:`typed_bootstrap`)."""
    return packed.unpack()


def check_typed(typed: Any, spec: SidecarSpec) -> None:
    """Read back, through the typed messages' own attributes, the properties a sidecar must have: one
    inbound listener whose ext_authz filter sends the peer certificate to meshauthz in ``spec.mode``, the
    route naming the workload in ``context_extensions``, mTLS when ``spec.tls`` is set, admin on loopback.
    """
    admin = typed.admin.address.socket_address
    if admin.address not in ("127.0.0.1", "::1"):
        raise _fail(f"admin must listen on loopback, not {admin.address}", "admin.address")
    listeners = typed.static_resources.listeners
    if len(listeners) != 1 or len(listeners[0].filter_chains) != 1:
        raise _fail("expected one listener with one filter chain", "static_resources.listeners")
    chain = listeners[0].filter_chains[0]
    hcm = _unpack(chain.filters[0].typed_config)
    filters = {f.name: _unpack(f.typed_config) for f in hcm.http_filters}
    ext_authz = filters.get("envoy.filters.http.ext_authz")
    if ext_authz is None or list(filters)[-1] != "envoy.filters.http.router":
        raise _fail("ext_authz must run before the router", "http_filters")
    if not ext_authz.include_peer_certificate:
        raise _fail("include_peer_certificate must be set", "http_filters.ext_authz")
    if ext_authz.failure_mode_allow != spec.failure_mode_allow:
        raise _fail("failure_mode_allow differs from the spec", "http_filters.ext_authz")
    service = ext_authz.grpc_service if spec.mode == "grpc" else ext_authz.http_service
    if service is None:
        raise _fail(f"ext_authz has no {spec.mode} service", "http_filters.ext_authz")
    route = hcm.route_config.virtual_hosts[0].routes[0]
    per_route = _unpack(route.typed_per_filter_config["envoy.filters.http.ext_authz"])
    if per_route.check_settings.context_extensions.get("namespace") != spec.namespace:
        raise _fail("the route does not name the workload namespace", "typed_per_filter_config")
    tls = chain.transport_socket
    if (spec.tls is None) != (tls is None):
        raise _fail("the listener's TLS does not match the spec", "filter_chains.transport_socket")
    if spec.tls is not None and bool(_unpack(tls.typed_config).require_client_certificate) != (
        spec.tls.require_client_certificate
    ):
        raise _fail("require_client_certificate differs from the spec", "transport_socket")
    clusters = {c.name for c in typed.static_resources.clusters}
    if clusters != {"app", "meshauthz"}:
        raise _fail(f"expected clusters app and meshauthz, got {sorted(clusters)}", "clusters")


def render(spec: SidecarSpec, *, listen_host: str = "127.0.0.1", output: str = "yaml") -> str:
    """The bootstrap text for ``spec``: built by ``sidecar_bootstrap``, checked and re-emitted through
    the typed message (canonical proto3 JSON field names), as YAML or JSON."""
    plain = sidecar_bootstrap(spec)
    if listen_host != "127.0.0.1" or not (_is_ip(spec.app_host) and _is_ip(spec.authz_host)):
        plain = with_listener_host(plain, listen_host)
    typed = typed_bootstrap(plain)
    check_typed(typed, spec)
    data: dict[str, Any] = typed.to_dict()
    # What is written must parse back to the same message (compared as proto3 JSON: an Any holds
    # serialized bytes, whose map-entry order is not canonical).
    if typed_bootstrap(data).to_dict() != data:
        raise ConfigError("the typed bootstrap does not round-trip", reason="invalid_envoy_config")
    if output == "json":
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    header = "# Envoy sidecar bootstrap written by `authz envoy-config` (checked against envoy-data-plane).\n"
    return header + yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


def _run(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
        listen_host, _ = parse_hostport(args.listen, field="--listen")
        if spec.tls is not None and args.check_files:
            for path in (spec.tls.cert_chain, spec.tls.private_key, spec.tls.trusted_ca):
                if not Path(path).is_file():
                    raise ConfigError(
                        "missing SVID file (mint one: authz ca issue SPIFFE_ID --ca DIR --out DIR)",
                        file=path,
                        field="--svid",
                        reason="missing_svid",
                    )
        text = render(spec, listen_host=listen_host, output=args.format)
    except ConfigError as exc:
        print(f"authz envoy-config: error: {exc} [{exc.reason}]", file=sys.stderr)
        return EXIT_ERROR
    if args.out in (None, "-"):
        sys.stdout.write(text)
        return EXIT_OK
    try:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"authz envoy-config: error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {args.out} ({spec.mode} ext_authz -> {spec.authz_host}:{spec.authz_port})", file=sys.stderr)
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Add ``authz envoy-config`` to the ``authz`` command."""
    p = subparsers.add_parser(
        "envoy-config",
        help="write an Envoy sidecar bootstrap whose ext_authz filter calls meshauthz",
        description="Write a complete Envoy bootstrap (checked against Envoy's typed protos): inbound "
        "listener (mTLS with --svid), ext_authz to meshauthz, the local app as upstream, admin on loopback.",
    )
    p.add_argument(
        "--mode", choices=["grpc", "http"], default="grpc", help="ext_authz protocol (default grpc)"
    )
    p.add_argument(
        "--authz",
        metavar="HOST:PORT",
        help=f"meshauthz (default {DEFAULT_AUTHZ_GRPC} gRPC, {DEFAULT_AUTHZ_HTTP} HTTP)",
    )
    p.add_argument("--app", default="127.0.0.1:8080", metavar="HOST:PORT", help="the local application")
    p.add_argument(
        "--listen", default="127.0.0.1:15006", metavar="HOST:PORT", help="inbound listener (default :15006)"
    )
    p.add_argument("--admin-port", type=int, default=15000, help="Envoy admin port on 127.0.0.1 (0: any)")
    p.add_argument("--namespace", default="default", help="workload namespace (context_extensions)")
    p.add_argument("--labels", default="", help="workload labels k=v,k2=v2 (context_extensions)")
    p.add_argument(
        "--svid", metavar="DIR", help="mTLS from this SVID directory (chain.pem, key.pem, bundle.pem)"
    )
    p.add_argument(
        "--optional-client-cert", action="store_true", help="accept callers without a client certificate"
    )
    p.add_argument(
        "--no-check-files",
        dest="check_files",
        action="store_false",
        help="do not require the SVID files to exist",
    )
    p.add_argument("--failure-mode-allow", action="store_true", help="allow when meshauthz is unreachable")
    p.add_argument("--timeout", default="1s", help="ext_authz call timeout (default 1s)")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout ('-': stdout)")
    p.set_defaults(func=_run)

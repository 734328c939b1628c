"""VirtualService routing: host -> virtual service -> first matching ``http[]`` rule (pure, compiled once).

Host selection follows Envoy's virtual-host domain order (exact, then the longest ``*.suffix``, then ``*``;
DPA ``VirtualHost.domains``); rules are ordered and the first match wins (VS l.196-200); match blocks are
OR'ed and their conditions AND'ed (VS l.398-402). No route => the caller answers 404 with flag ``NR``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from authz.proxy.loader import DEFAULT_RETRY_POLICY
from authz.proxy.model import HeaderMatch, HTTPMatch, HTTPRoute, MeshView, RouteDestination, VirtualService

__all__ = ["RouteMatch", "Router", "rewrite_target", "split_authority"]


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The chosen rule; ``prefix`` is the matched URI prefix when a prefix match chose it (for rewrites)."""

    route: HTTPRoute
    virtual_service: str
    prefix: str | None = None


def split_authority(authority: str) -> tuple[str, int | None]:
    """``host[:port]`` -> (lower-case host, port); IPv6 literals keep their brackets."""
    a = authority.strip().lower()
    if a.startswith("["):
        end = a.find("]")
        host, rest = a[: end + 1], a[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = a.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return a, None


def _short_names(host: str) -> list[str]:
    """``x.ns.svc.cluster.local`` is also reachable as ``x``, ``x.ns`` and ``x.ns.svc`` from a sidecar."""
    parts = host.split(".")
    if len(parts) >= 4 and parts[2] == "svc":
        return [host, parts[0], ".".join(parts[:2]), ".".join(parts[:3])]
    return [host]


def _header_ok(m: HeaderMatch, headers: Mapping[str, str]) -> bool:
    value = headers.get(m.name)
    if value is None:
        return False
    return m.match is None or m.match.matches(value)


def _match(
    m: HTTPMatch,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    *,
    scheme: str,
    authority: str,
) -> bool:
    if m.uri is not None and not m.uri.matches(path, ignore_case=m.ignore_uri_case):
        return False
    if m.method is not None and not m.method.matches(method):
        return False
    if m.authority is not None and not m.authority.matches(authority):
        return False
    if m.scheme is not None and not m.scheme.matches(scheme):
        return False
    if not all(_header_ok(h, headers) for h in m.headers):
        return False
    if any(_header_ok(h, headers) for h in m.without_headers):
        return False
    if m.query_params:
        params = dict(parse_qsl(query, keep_blank_values=True))
        for name, sm in m.query_params:
            if name not in params or not sm.matches(params[name]):
                return False
    return True


class Router:
    """Compiled routing table for one configuration generation."""

    def __init__(self, mesh: MeshView) -> None:
        self._exact: dict[str, VirtualService] = {}
        self._wildcards: list[tuple[str, VirtualService]] = []
        self._catch_all: VirtualService | None = None
        for vs in mesh.virtual_services:
            for h in vs.hosts:
                self._add(h, vs)
        # A ServiceEntry host with no VirtualService gets Istio's default route: all traffic, default retries.
        for se in mesh.service_entries:
            for h in se.hosts:
                if self._lookup(h) is None and not h.startswith("*"):
                    default = HTTPRoute(
                        name="default",
                        matches=(),
                        destinations=(RouteDestination(host=h),),
                        retries=DEFAULT_RETRY_POLICY,
                    )
                    self._add(h, VirtualService(f"default-{h}", se.namespace, (h,), (default,)))
        self._wildcards.sort(key=lambda item: -len(item[0]))

    def _add(self, host: str, vs: VirtualService) -> None:
        if host == "*":
            self._catch_all = self._catch_all or vs
        elif host.startswith("*."):
            self._wildcards.append((host[1:], vs))
        else:
            for name in _short_names(host):
                self._exact.setdefault(name, vs)

    def _lookup(self, host: str) -> VirtualService | None:
        vs = self._exact.get(host)
        if vs is not None:
            return vs
        for suffix, wvs in self._wildcards:
            if host.endswith(suffix):
                return wvs
        return self._catch_all

    def route(
        self,
        authority: str,
        method: str,
        target: str,
        headers: Mapping[str, str],
        *,
        scheme: str = "http",
    ) -> RouteMatch | None:
        """The first rule of the virtual service for ``authority`` that matches, or None (404 NR).

        ``uri`` matches the path without the query string (VS l.741-752); ``headers`` has lower-case
        names and duplicate values joined with ``,``.
        """
        host, _ = split_authority(authority)
        vs = self._lookup(host)
        if vs is None:
            return None
        path, _, query = target.partition("?")
        for route in vs.http:
            if not route.matches:
                return RouteMatch(route, f"{vs.namespace}/{vs.name}")
            for m in route.matches:
                if _match(m, method, path, query, headers, scheme=scheme, authority=authority):
                    prefix = m.uri.value if m.uri is not None and m.uri.kind == "prefix" else None
                    return RouteMatch(route, f"{vs.namespace}/{vs.name}", prefix)
        return None


def rewrite_target(target: str, new_uri: str, prefix: str | None) -> str:
    """``rewrite.uri``: replace the matched prefix after a prefix match, else the whole path (VS l.1264-1268).

    The query string is kept, as Envoy's path rewrites do.
    """
    path, sep, query = target.partition("?")
    new_path = new_uri + path[len(prefix) :] if prefix is not None else new_uri
    if not new_path.startswith("/"):
        new_path = "/" + new_path
    return new_path + sep + query

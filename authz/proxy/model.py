"""Frozen values for the proxy's configuration: Istio networking/security resources, already validated.

Field names follow ``networking.istio.io/v1`` and ``security.istio.io/v1`` (VirtualService, DestinationRule,
ServiceEntry, PeerAuthentication); defaults are Istio's, each cited where it is set in
:mod:`authz.proxy.loader`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from authz.request import EMPTY_MAP

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "ConnectionPoolSettings",
    "DestinationRule",
    "DirectResponse",
    "Fault",
    "HTTPMatch",
    "HTTPRedirect",
    "HTTPRoute",
    "HeaderMatch",
    "HeaderOperations",
    "Headers",
    "LoadBalancerSettings",
    "MeshView",
    "Mirror",
    "OutlierDetection",
    "PeerAuthentication",
    "RetryPolicy",
    "RouteDestination",
    "ServiceEntry",
    "ServicePort",
    "StringMatch",
    "Subset",
    "TLSSettings",
    "TrafficPolicy",
    "VirtualService",
    "WorkloadEndpoint",
    "merge_subset_policy",
]

DEFAULT_TRUST_DOMAIN = "cluster.local"  # Istio MeshConfig.trustDomain default


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio ``StringMatch``: exactly one of exact, prefix, regex (VS l.741-752)."""

    kind: Literal["exact", "prefix", "regex"]
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, text: str, *, ignore_case: bool = False) -> bool:
        """``ignoreUriCase`` applies to exact and prefix only; regex uses ``(?i)`` (VS l.846-850).

        Envoy ``safe_regex`` is a full-string RE2 match; Python ``re.fullmatch`` is the nearest equivalent.
        """
        if self.kind == "exact":
            return text.lower() == self.value.lower() if ignore_case else text == self.value
        if self.kind == "prefix":
            return text.lower().startswith(self.value.lower()) if ignore_case else text.startswith(self.value)
        assert self.pattern is not None
        return self.pattern.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header condition; ``match is None`` is the empty matcher ``{}``: presence only (VS l.787-807)."""

    name: str
    match: StringMatch | None


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    """One ``HTTPMatchRequest``: every condition must hold (AND, VS l.398-402)."""

    name: str = ""
    uri: StringMatch | None = None
    ignore_uri_case: bool = False
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    without_headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    """``set`` overwrites, ``add`` appends, ``remove`` deletes (VS l.610-626)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not (self.set or self.add or self.remove):
            return headers
        drop = set(self.remove) | {k for k, _ in self.set}
        out = [(k, v) for k, v in headers if k not in drop]
        out.extend(self.set)
        out.extend(self.add)
        return out


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations = field(default_factory=HeaderOperations)
    response: HeaderOperations = field(default_factory=HeaderOperations)


@dataclass(frozen=True, slots=True)
class RouteDestination:
    """``HTTPRouteDestination``: service host (FQDN), optional subset and port, weight, headers."""

    host: str
    subset: str = ""
    port: int | None = None
    weight: int = 100
    headers: Headers = field(default_factory=Headers)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Envoy retry policy as istiod builds it (IST ``retry.go``).

    ``attempts`` counts retries, not tries (VS l.1336-1343). ``retry_on`` holds Envoy condition names;
    ``status_codes`` the bare integers of ``retryOn``.
    """

    attempts: int
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset()
    status_codes: frozenset[int] = frozenset()
    retry_other_host: bool = True
    backoff_base: float = 0.025


@dataclass(frozen=True, slots=True)
class Fault:
    """``HTTPFaultInjection``: no percentage ⇒ nothing delayed or aborted (IST ``TranslateFault``)."""

    delay: float | None = None
    delay_percent: float = 0.0
    abort_status: int | None = None
    abort_grpc: str = ""
    abort_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class Mirror:
    """A mirror target and its percentage (absent ⇒ 100, VS l.464-490)."""

    host: str
    subset: str = ""
    port: int | None = None
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    """VS ``HTTPRedirect`` (VS l.1100-1145), kept as written; istiod's translation to Envoy's
    ``RedirectAction`` (IST ``route.go`` ``ApplyRedirect``) runs per request in
    :func:`authz.proxy.local_reply.redirect_location`, because ``FROM_REQUEST_PORT`` needs the request.

    ``port`` None and ``derive_port`` "" = no ``redirectPort`` oneof set; ``code`` is 301 when unset.
    """

    uri: str = ""
    authority: str = ""
    port: int | None = None
    derive_port: Literal["", "FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] = ""
    scheme: str = ""
    code: int = 301


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """VS ``HTTPDirectResponse`` (VS l.1219-1235): a fixed status and body, no upstream."""

    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    """One ``http[]`` rule of a VirtualService.

    A rule has either ``destinations`` or exactly one of ``redirect`` / ``direct_response`` (validated by the
    loader as istiod's ``validateHTTPRouteConflict`` does), so "no destinations" means "answer locally".
    """

    name: str
    matches: tuple[HTTPMatch, ...]
    destinations: tuple[RouteDestination, ...]
    rewrite_uri: str | None = None
    rewrite_authority: str | None = None
    timeout: float | None = None
    retries: RetryPolicy | None = None
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    headers: Headers = field(default_factory=Headers)
    compare_mirror: tuple[str, ...] | None = None
    """Extension (annotation ``meshauthz.dev/compare-mirror``): headers compared with the mirror's."""
    redirect: HTTPRedirect | None = None
    direct_response: DirectResponse | None = None


@dataclass(frozen=True, slots=True)
class VirtualService:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    http: tuple[HTTPRoute, ...]


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    """``simple`` (LEAST_REQUEST default, DR ``LoadBalancerSettings``) or a consistent hash on a header."""

    simple: Literal["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"] = "LEAST_REQUEST"
    hash_header: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    """Istio defaults are "unlimited" (2^32-1); timeouts are Istio's ``connectTimeout`` 10 s default."""

    max_connections: int = 2**32 - 1
    max_pending_requests: int = 2**32 - 1
    max_requests: int = 2**32 - 1
    max_requests_per_connection: int = 0  # 0 = unlimited
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0  # Istio/Envoy idle_timeout default 1 h


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """DR ``OutlierDetection`` with Istio's defaults."""

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 0
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


TLSMode = Literal["", "DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """``ClientTLSSettings`` (DR l.942-1031); ``mode`` "" means unset (auto mTLS decides from the endpoint's
    labels). File paths are resolved against the configuration folder; "" = not set.

    SIMPLE / MUTUAL originate TLS to the endpoint: the chain is checked against ``ca_certificates`` (the
    system store when ""), unless ``insecure_skip_verify``; MUTUAL also presents ``client_certificate`` with
    ``private_key``. ``sni`` "" = the destination host (Envoy ``auto_sni``).
    """

    mode: TLSMode = ""
    subject_alt_names: tuple[str, ...] = ()
    ca_certificates: str = ""
    client_certificate: str = ""
    private_key: str = ""
    sni: str = ""
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """Each section ``None`` = not set; a subset's set section replaces the top-level one (DR l.363-376)."""

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: TLSSettings | None = None
    port_level: tuple[tuple[int, TrafficPolicy], ...] = ()
    """``portLevelSettings``: (service port number, its policy); the first entry for a port wins."""

    def merged_over(self, parent: TrafficPolicy) -> TrafficPolicy:
        return TrafficPolicy(
            load_balancer=self.load_balancer or parent.load_balancer,
            connection_pool=self.connection_pool or parent.connection_pool,
            outlier_detection=self.outlier_detection or parent.outlier_detection,
            tls=self.tls or parent.tls,
        )

    def for_port(self, port: int | None) -> tuple[TrafficPolicy, bool]:
        """The policy for service ``port`` and whether a port-level entry chose it.

        IST ``GetPortLevelTrafficPolicy``: a matching ``portLevelSettings`` entry replaces the whole policy;
        "port level policies do not inherit", so its unset sections take the defaults, not the top level's.
        """
        if port is not None:
            for number, policy in self.port_level:
                if number == port:
                    return policy, True
        return self, False


def merge_subset_policy(top: TrafficPolicy, subset: TrafficPolicy | None, port: int | None) -> TrafficPolicy:
    """The policy of a cluster for ``port`` (and a subset), built as istiod's ``MergeSubsetTrafficPolicy``.

    Port level first, on both the DestinationRule's and the subset's policy; then each section the subset
    sets replaces the top-level one, and a subset port-level entry replaces all four sections (IST
    ``mergeTrafficPolicy``: ``if subsetPolicy.Tls != nil || hasPortLevel``).
    """
    base, _ = top.for_port(port)
    if subset is None:
        return TrafficPolicy(base.load_balancer, base.connection_pool, base.outlier_detection, base.tls)
    chosen, port_level = subset.for_port(port)
    if port_level:
        return TrafficPolicy(
            chosen.load_balancer, chosen.connection_pool, chosen.outlier_detection, chosen.tls
        )
    return TrafficPolicy(
        load_balancer=chosen.load_balancer or base.load_balancer,
        connection_pool=chosen.connection_pool or base.connection_pool,
        outlier_detection=chosen.outlier_detection or base.outlier_detection,
        tls=chosen.tls or base.tls,
    )


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    traffic_policy: TrafficPolicy = field(default_factory=TrafficPolicy)


@dataclass(frozen=True, slots=True)
class DestinationRule:
    name: str
    namespace: str
    host: str
    traffic_policy: TrafficPolicy = field(default_factory=TrafficPolicy)
    subsets: tuple[Subset, ...] = ()


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str = ""
    protocol: str = "HTTP"
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEndpoint:
    """A ``ServiceEntry.endpoints[]`` entry (``WorkloadEntry`` shape)."""

    address: str
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY_MAP)
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    service_account: str = ""
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    resolution: Literal["NONE", "STATIC", "DNS"]
    endpoints: tuple[WorkloadEndpoint, ...]


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """``security.istio.io/v1`` PeerAuthentication; ``mode`` "UNSET" inherits from the parent scope."""

    name: str
    namespace: str
    selector: Mapping[str, str] | None
    mode: Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
    port_level: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MeshView:
    """Every Istio resource the sidecar knows about, validated. The router and clusters compile from it."""

    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    service_entries: tuple[ServiceEntry, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()

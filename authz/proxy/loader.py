"""Istio networking/security YAML -> validated :mod:`authz.proxy.model` values, errors naming file:line:field.

Kinds: ``VirtualService``, ``DestinationRule``, ``ServiceEntry`` (``networking.istio.io/v1``, ``v1beta1``,
``v1alpha3``: the same messages, API ``networking/v1/*_alias.gen.go``), ``PeerAuthentication``
(``security.istio.io/v1``, ``v1beta1``) and our ``ProxyConfig`` (``meshauthz.dev/v1alpha1``). Other kinds
are ignored so that one folder can hold the whole mesh's configuration.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast, get_args

from authz.config import PathNormalization
from authz.errors import ConfigError, ConfigErrors
from authz.proxy.http1 import valid_header_name, valid_header_value
from authz.proxy.model import (
    DEFAULT_TRUST_DOMAIN,
    ConnectionPoolSettings,
    DestinationRule,
    DirectResponse,
    Fault,
    HeaderMatch,
    HeaderOperations,
    Headers,
    HTTPMatch,
    HTTPRedirect,
    HTTPRoute,
    LoadBalancerSettings,
    MeshView,
    Mirror,
    OutlierDetection,
    PeerAuthentication,
    RetryPolicy,
    RouteDestination,
    ServiceEntry,
    ServicePort,
    StringMatch,
    Subset,
    TLSSettings,
    TrafficPolicy,
    VirtualService,
    WorkloadEndpoint,
)
from authz.proxy.settings import (
    AuthorizerSettings,
    ClientCertDetails,
    ForwardClientCert,
    IdentityFiles,
    ListenerSettings,
    ProxySettings,
    SidecarConfig,
)
from authz.resources import FieldPath, Resource, load_resources

__all__ = [
    "DEFAULT_RETRY_ON",
    "DEFAULT_RETRY_POLICY",
    "MAX_DIRECT_RESPONSE_BYTES",
    "REDIRECT_CODES",
    "RETRY_CONDITIONS",
    "fqdn",
    "load_sidecar_config",
    "parse_duration",
    "parse_mesh",
    "parse_resources",
]

NETWORKING_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
PROXY_VERSION = "meshauthz.dev/v1alpha1"
COMPARE_MIRROR_ANNOTATION = "meshauthz.dev/compare-mirror"

RETRY_CONDITIONS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "refused-stream",
        "retriable-4xx",
        "retriable-status-codes",
        "envoy-ratelimited",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
# IST pilot/pkg/networking/core/route/retry/retry.go l.36-37, 94-104: 2 retries on these, other host
# preferred.
DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)
DEFAULT_RETRY_POLICY = RetryPolicy(attempts=2, retry_on=DEFAULT_RETRY_ON)

# IST route.go ApplyRedirect: the codes Envoy's RedirectAction has; any other code leaves the route without an
# action (istiod logs "Redirect Code %d is not yet supported"), so it is an error here.
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# IST validation.go validateHTTPDirectResponse: bodies above 1 MB are rejected ("must be less than 1MB").
MAX_DIRECT_RESPONSE_BYTES = 1024 * 1024
_REDIRECT_FIELDS = frozenset({"uri", "authority", "port", "derivePort", "scheme", "redirectCode"})
_DERIVE_PORTS = ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")
_TLS_FIELDS = frozenset(
    {
        "mode",
        "clientCertificate",
        "privateKey",
        "caCertificates",
        "credentialName",
        "subjectAltNames",
        "sni",
        "insecureSkipVerify",
        "caCrl",
    }
)
_TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")

_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_GRPC_ABORT = {
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
}


def parse_duration(text: str) -> float:
    """Go/protobuf duration text (``"1.5s"``, ``"100ms"``, ``"1m30s"``) to seconds; ValueError if bad."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if m is None:
            raise ValueError(f"malformed duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


def fqdn(host: str, namespace: str, domain: str = "cluster.local") -> str:
    """Istio expands a short name with the resource's namespace: ``reviews`` ->
    ``reviews.ns.svc.cluster.local``
    (VS ``hosts`` l.150-178). Names with a dot, wildcards and ``*`` are kept as written (lower-cased)."""
    h = host.strip().lower()
    if "." in h or h.startswith("*"):
        return h
    return f"{h}.{namespace}.svc.{domain}"


class _Reader:
    """Typed access into one resource's ``spec``; mistakes become ConfigError naming file:line:field."""

    def __init__(self, resource: Resource, errors: list[ConfigError], base: Path | None = None) -> None:
        self.r = resource
        self.errors = errors
        self.base = base

    def file_path(self, value: Any, path: FieldPath) -> str:
        """A file named by the configuration: resolved against its folder, and it must exist."""
        text = self.string(value, path)
        if not text:
            return ""
        resolved = Path(text) if self.base is None or Path(text).is_absolute() else self.base / text
        if not resolved.is_file():
            self.fail(path, f"no such file: {resolved}")
        return str(resolved)

    def fail(self, path: FieldPath, message: str) -> None:
        self.errors.append(self.r.error(path, message))

    def get(self, data: Mapping[str, Any], key: str) -> Any:
        return data.get(key) if isinstance(data, Mapping) else None

    def mapping(self, value: Any, path: FieldPath) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, "must be a mapping")
            return {}
        return value

    def seq(self, value: Any, path: FieldPath) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, "must be a list")
            return []
        return value

    def string(self, value: Any, path: FieldPath, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(path, "must be a string")
            return default
        return value

    def integer(self, value: Any, path: FieldPath, default: int, *, lo: int = 0, hi: int = 2**32 - 1) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(path, f"must be an integer in [{lo}, {hi}]")
            return default
        return value

    def number(self, value: Any, path: FieldPath, default: float, *, lo: float, hi: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            self.fail(path, f"must be a number in [{lo}, {hi}]")
            return default
        return float(value)

    def boolean(self, value: Any, path: FieldPath, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, "must be true or false")
            return default
        return value

    def duration(self, value: Any, path: FieldPath, *, minimum: float = 0.0) -> float | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(path, "must be a duration string such as '1s' or '250ms'")
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(path, str(exc))
            return None
        if seconds < minimum:
            self.fail(path, f"must be at least {minimum * 1000:g}ms")
            return None
        return seconds

    def labels(self, value: Any, path: FieldPath) -> dict[str, str]:
        m = self.mapping(value, path)
        out: dict[str, str] = {}
        for k, v in m.items():
            if not isinstance(v, str):
                self.fail((*path, k), "label values must be strings")
            else:
                out[k] = v
        return out

    def string_match(self, value: Any, path: FieldPath) -> StringMatch | None:
        m = self.mapping(value, path)
        keys = [k for k in ("exact", "prefix", "regex") if k in m]
        unknown = set(m) - {"exact", "prefix", "regex"}
        if unknown:
            self.fail((*path, sorted(unknown)[0]), "unknown StringMatch field")
            return None
        if len(keys) != 1:
            self.fail(path, "exactly one of exact, prefix, regex is required")
            return None
        kind = keys[0]
        text = self.string(m[kind], (*path, kind))
        if kind == "regex":
            try:
                return StringMatch("regex", text, re.compile(text))
            except re.error as exc:
                self.fail((*path, kind), f"invalid regex: {exc}")
                return None
        return StringMatch(cast(Any, kind), text)

    def header_ops(self, value: Any, path: FieldPath) -> HeaderOperations:
        m = self.mapping(value, path)
        pairs: dict[str, tuple[tuple[str, str], ...]] = {}
        for op in ("set", "add"):
            items = []
            for k, v in self.mapping(m.get(op), (*path, op)).items():
                name = k.lower()
                if not valid_header_name(name) or not isinstance(v, str) or not valid_header_value(v):
                    self.fail((*path, op, k), "invalid header name or value")
                    continue
                items.append((name, v))
            pairs[op] = tuple(items)
        remove = []
        for i, k in enumerate(self.seq(m.get("remove"), (*path, "remove"))):
            if not isinstance(k, str) or not valid_header_name(k.lower()):
                self.fail((*path, "remove", i), "invalid header name")
                continue
            remove.append(k.lower())
        return HeaderOperations(set=pairs["set"], add=pairs["add"], remove=tuple(remove))

    def headers(self, value: Any, path: FieldPath) -> Headers:
        m = self.mapping(value, path)
        return Headers(
            request=self.header_ops(m.get("request"), (*path, "request")),
            response=self.header_ops(m.get("response"), (*path, "response")),
        )

    def percent(self, value: Any, path: FieldPath, default: float) -> float:
        """Istio ``Percent {value: double}`` (0-100)."""
        if value is None:
            return default
        m = self.mapping(value, path)
        return self.number(m.get("value"), (*path, "value"), 0.0, lo=0.0, hi=100.0)


# -- VirtualService -------------------------------------------------------------------------------------


def _parse_match(rd: _Reader, m: Mapping[str, Any], path: FieldPath) -> HTTPMatch:
    def header_list(key: str) -> tuple[HeaderMatch, ...]:
        out = []
        for name, spec in rd.mapping(m.get(key), (*path, key)).items():
            lname = name.lower()
            if lname in ("uri", "scheme", "method", "authority"):
                continue  # VS l.787-807: these keys are ignored in headers
            if spec is None or spec == {}:
                out.append(HeaderMatch(lname, None))
            else:
                out.append(HeaderMatch(lname, rd.string_match(spec, (*path, key, name))))
        return tuple(out)

    def sm(key: str) -> StringMatch | None:
        return rd.string_match(m[key], (*path, key)) if key in m else None

    query = tuple(
        (k, sq)
        for k, v in rd.mapping(m.get("queryParams"), (*path, "queryParams")).items()
        if (sq := rd.string_match(v, (*path, "queryParams", k))) is not None
    )
    return HTTPMatch(
        name=rd.string(m.get("name"), (*path, "name")),
        uri=sm("uri"),
        ignore_uri_case=rd.boolean(m.get("ignoreUriCase"), (*path, "ignoreUriCase"), False),
        method=sm("method"),
        authority=sm("authority"),
        scheme=sm("scheme"),
        headers=header_list("headers"),
        without_headers=header_list("withoutHeaders"),
        query_params=query,
    )


def _parse_destination(rd: _Reader, d: Any, path: FieldPath) -> tuple[str, str, int | None]:
    m = rd.mapping(d, path)
    host = rd.string(m.get("host"), (*path, "host"))
    if not host:
        rd.fail((*path, "host"), "destination host is required")
    port_spec = rd.mapping(m.get("port"), (*path, "port"))
    port = rd.integer(port_spec.get("number"), (*path, "port", "number"), 0, lo=1, hi=65535) or None
    return fqdn(host, rd.r.namespace), rd.string(m.get("subset"), (*path, "subset")), port


def _parse_retries(rd: _Reader, value: Any, path: FieldPath) -> RetryPolicy | None:
    """VS ``HTTPRetry`` as istiod translates it (IST ``retry.go`` ``ConvertPolicy``)."""
    if value is None:
        return DEFAULT_RETRY_POLICY
    m = rd.mapping(value, path)
    attempts = rd.integer(m.get("attempts"), (*path, "attempts"), 0, hi=1000)
    if attempts <= 0:  # IST retry.go: Attempts <= 0 => no retry policy at all
        return None
    retry_on = set(DEFAULT_RETRY_ON)
    codes: set[int] = set()
    if "retryOn" in m:
        retry_on = set()
        text = rd.string(m.get("retryOn"), (*path, "retryOn"))
        for token in (t.strip() for t in text.split(",")):
            if not token:
                continue
            if token.isdigit():  # IST retry.go l.202-226: bare integers are retriable status codes
                codes.add(int(token))
                retry_on.add("retriable-status-codes")
            elif token in RETRY_CONDITIONS:
                retry_on.add(token)
            else:
                rd.fail((*path, "retryOn"), f"unknown retry condition {token!r}")
    backoff = rd.duration(m.get("backoff"), (*path, "backoff"), minimum=0.001)
    return RetryPolicy(
        attempts=attempts,
        per_try_timeout=rd.duration(m.get("perTryTimeout"), (*path, "perTryTimeout"), minimum=0.001),
        retry_on=frozenset(retry_on),
        status_codes=frozenset(codes),
        retry_other_host=rd.boolean(
            m.get("retryIgnorePreviousHosts"), (*path, "retryIgnorePreviousHosts"), True
        ),
        backoff_base=backoff if backoff is not None else 0.025,
    )


def _parse_fault(rd: _Reader, value: Any, path: FieldPath) -> Fault | None:
    if value is None:
        return None
    m = rd.mapping(value, path)
    delay = rd.mapping(m.get("delay"), (*path, "delay"))
    abort = rd.mapping(m.get("abort"), (*path, "abort"))
    fixed = rd.duration(delay.get("fixedDelay"), (*path, "delay", "fixedDelay"), minimum=0.001)
    if delay and fixed is None and "fixedDelay" not in delay:
        rd.fail((*path, "delay", "fixedDelay"), "fixedDelay is required")
    status = None
    grpc = ""
    if abort:
        if "httpStatus" in abort:
            status = rd.integer(abort.get("httpStatus"), (*path, "abort", "httpStatus"), 503, lo=200, hi=599)
        elif "grpcStatus" in abort:
            grpc = rd.string(abort.get("grpcStatus"), (*path, "abort", "grpcStatus")).upper()
            if grpc not in _GRPC_ABORT:
                rd.fail((*path, "abort", "grpcStatus"), "unknown gRPC status")
        else:
            rd.fail((*path, "abort"), "httpStatus or grpcStatus is required")
    return Fault(
        delay=fixed,
        # VS l.1481-1529, IST TranslateFault: no percentage => no request is faulted.
        delay_percent=rd.percent(delay.get("percentage"), (*path, "delay", "percentage"), 0.0),
        abort_status=status,
        abort_grpc=grpc,
        abort_percent=rd.percent(abort.get("percentage"), (*path, "abort", "percentage"), 0.0),
    )


def _parse_route(
    rd: _Reader, r: Mapping[str, Any], path: FieldPath, compare: tuple[str, ...] | None
) -> HTTPRoute:
    matches = tuple(
        _parse_match(rd, rd.mapping(m, (*path, "match", i)), (*path, "match", i))
        for i, m in enumerate(rd.seq(r.get("match"), (*path, "match")))
    )
    dests = []
    routes = rd.seq(r.get("route"), (*path, "route"))
    for i, d in enumerate(routes):
        dp = (*path, "route", i)
        dm = rd.mapping(d, dp)
        host, subset, port = _parse_destination(rd, dm.get("destination"), (*dp, "destination"))
        # VS l.940-955: a single destination gets all traffic; weights are relative.
        weight = rd.integer(dm.get("weight"), (*dp, "weight"), 100 if len(routes) == 1 else 0, hi=2**31)
        dests.append(
            RouteDestination(host, subset, port, weight, rd.headers(dm.get("headers"), (*dp, "headers")))
        )
    redirect = (
        _parse_redirect(rd, r["redirect"], (*path, "redirect")) if r.get("redirect") is not None else None
    )
    direct = (
        _parse_direct_response(rd, r["directResponse"], (*path, "directResponse"))
        if r.get("directResponse") is not None
        else None
    )
    _check_route_conflicts(rd, r, path, dests=bool(dests))
    if dests and sum(d.weight for d in dests) == 0:
        rd.fail((*path, "route"), "the weights of the destinations add up to 0")
    rewrite = rd.mapping(r.get("rewrite"), (*path, "rewrite"))
    mirrors = []
    if r.get("mirror") is not None:
        host, subset, port = _parse_destination(rd, r.get("mirror"), (*path, "mirror"))
        # IST route.go MirrorPercent l.902-925: mirrorPercentage absent => 100%.
        pct = rd.percent(r.get("mirrorPercentage"), (*path, "mirrorPercentage"), 100.0)
        mirrors.append(Mirror(host, subset, port, pct))
    for i, mp in enumerate(rd.seq(r.get("mirrors"), (*path, "mirrors"))):
        mpp = (*path, "mirrors", i)
        mm = rd.mapping(mp, mpp)
        host, subset, port = _parse_destination(rd, mm.get("destination"), (*mpp, "destination"))
        mirrors.append(
            Mirror(host, subset, port, rd.percent(mm.get("percentage"), (*mpp, "percentage"), 100.0))
        )
    uri = rewrite.get("uri")
    authority = rewrite.get("authority")
    return HTTPRoute(
        name=rd.string(r.get("name"), (*path, "name")),
        matches=matches,
        destinations=tuple(dests),
        rewrite_uri=rd.string(uri, (*path, "rewrite", "uri")) if uri is not None else None,
        rewrite_authority=rd.string(authority, (*path, "rewrite", "authority"))
        if authority is not None
        else None,
        # VS l.444-445, IST route.go: Istio disables the route timeout by default.
        timeout=rd.duration(r.get("timeout"), (*path, "timeout")) or None,
        retries=_parse_retries(rd, r.get("retries"), (*path, "retries")),
        fault=_parse_fault(rd, r.get("fault"), (*path, "fault")),
        mirrors=tuple(mirrors),
        headers=rd.headers(r.get("headers"), (*path, "headers")),
        compare_mirror=compare,
        redirect=redirect,
        direct_response=direct,
    )


def _check_route_conflicts(rd: _Reader, r: Mapping[str, Any], path: FieldPath, *, dests: bool) -> None:
    """IST ``validation.go`` ``validateHTTPRouteConflict``: a rule forwards (``route``), redirects or answers
    directly, never two of them; a redirect or direct response takes no ``fault`` or ``rewrite``. Each error
    names the field that conflicts."""
    for local, name in (("redirect", "redirect"), ("directResponse", "direct_response")):
        if r.get(local) is None:
            continue
        others = ["route", "fault", "rewrite"] + (["directResponse"] if local == "redirect" else [])
        for other in others:
            present = dests if other == "route" else r.get(other) is not None
            if present:
                rd.fail((*path, other), f"HTTP route cannot contain both {other} and {name}")
        return
    if not dests:
        rd.fail((*path, "route"), "a route needs at least one destination (or a redirect or directResponse)")


def _parse_redirect(rd: _Reader, value: Any, path: FieldPath) -> HTTPRedirect:
    """VS ``HTTPRedirect`` validated as istiod's ``validateHTTPRedirect`` does."""
    m = rd.mapping(value, path)
    for key in sorted(set(m) - _REDIRECT_FIELDS, key=str):
        rd.fail((*path, str(key)), "unknown HTTPRedirect field")
    uri = rd.string(m.get("uri"), (*path, "uri"))
    authority = rd.string(m.get("authority"), (*path, "authority"))
    for key, text in (("uri", uri), ("authority", authority)):
        if text and not valid_header_value(text):  # both end up in the Location header
            rd.fail((*path, key), "must be a valid header value (no control characters)")
    if authority and ("/" in authority or " " in authority):
        rd.fail((*path, "authority"), "must be a host[:port], without a path")
    scheme = rd.string(m.get("scheme"), (*path, "scheme"))
    if scheme and scheme not in ("http", "https"):
        rd.fail((*path, "scheme"), 'invalid redirect scheme, must be "http" or "https"')
    port = None
    if m.get("port") is not None:
        port = rd.integer(m.get("port"), (*path, "port"), 0, lo=1, hi=65535) or None
    derive = rd.string(m.get("derivePort"), (*path, "derivePort"))
    if derive and derive not in _DERIVE_PORTS:
        rd.fail((*path, "derivePort"), f"must be one of {', '.join(_DERIVE_PORTS)}")
        derive = ""
    if m.get("port") is not None and m.get("derivePort") is not None:
        rd.fail((*path, "derivePort"), "port and derivePort are alternatives (a oneof): set one")
    code = rd.integer(m.get("redirectCode"), (*path, "redirectCode"), 301)
    code = code or 301  # IST ApplyRedirect: 0 (unset) is MOVED_PERMANENTLY
    if code not in REDIRECT_CODES:
        rd.fail(
            (*path, "redirectCode"), "must be one of 301, 302, 303, 307, 308 (Envoy's RedirectAction codes)"
        )
    if not (uri or authority or scheme or m.get("port") is not None or m.get("derivePort") is not None):
        rd.fail(path, "redirect must specify uri, authority, scheme, or port")
    return HTTPRedirect(uri, authority, port, cast(Any, derive), scheme, code)


def _parse_direct_response(rd: _Reader, value: Any, path: FieldPath) -> DirectResponse:
    """VS ``HTTPDirectResponse`` validated as istiod's ``validateHTTPDirectResponse`` does; ``body.bytes`` is
    base64 (the protobuf JSON mapping of ``bytes``)."""
    m = rd.mapping(value, path)
    for key in sorted(set(m) - {"status", "body"}, key=str):
        rd.fail((*path, str(key)), "unknown HTTPDirectResponse field")
    if m.get("status") is None:
        rd.fail((*path, "status"), "status is required")
    status = rd.integer(m.get("status"), (*path, "status"), 200, lo=200, hi=599)
    body = b""
    if m.get("body") is not None:
        bp = (*path, "body")
        bm = rd.mapping(m.get("body"), bp)
        for key in sorted(set(bm) - {"string", "bytes"}, key=str):
            rd.fail((*bp, str(key)), "unknown HTTPBody field")
        kinds = [k for k in ("string", "bytes") if k in bm]
        if len(kinds) != 1:
            rd.fail(bp, "exactly one of string, bytes is required")
        elif kinds[0] == "string":
            body = rd.string(bm.get("string"), (*bp, "string")).encode()
        else:
            text = rd.string(bm.get("bytes"), (*bp, "bytes"))
            try:
                body = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                rd.fail((*bp, "bytes"), "must be base64")
        if len(body) > MAX_DIRECT_RESPONSE_BYTES:
            rd.fail(bp, "large direct_responses may impact control plane performance, must be less than 1MB")
    return DirectResponse(status, body)


def _applies_to_sidecar(rd: _Reader, gateways: Any, path: FieldPath) -> bool:
    """VS ``gateways``: absent means ``mesh`` (all sidecars); otherwise only when ``mesh`` is listed."""
    items = rd.seq(gateways, path)
    return not items or "mesh" in items


def _parse_virtual_service(rd: _Reader, settings: ProxySettings) -> VirtualService:
    spec = rd.mapping(rd.r.spec, ("spec",))
    hosts = tuple(
        fqdn(rd.string(h, ("spec", "hosts", i)), rd.r.namespace)
        for i, h in enumerate(rd.seq(spec.get("hosts"), ("spec", "hosts")))
    )
    if not hosts:
        rd.fail(("spec", "hosts"), "at least one host is required")
    compare_text = rd.r.annotations.get(COMPARE_MIRROR_ANNOTATION)
    compare = (
        tuple(h.strip().lower() for h in compare_text.split(",") if h.strip())
        if compare_text is not None
        else None
    )
    routes = []
    if _applies_to_sidecar(rd, spec.get("gateways"), ("spec", "gateways")):
        for i, r in enumerate(rd.seq(spec.get("http"), ("spec", "http"))):
            path: FieldPath = ("spec", "http", i)
            rm = rd.mapping(r, path)
            route = _parse_route(rd, rm, path, compare)
            # sourceLabels / gateways on a match select which proxies apply it (VS l.809-862): filter at load.
            kept = []
            for j, m in enumerate(rd.seq(rm.get("match"), (*path, "match"))):
                mm = rd.mapping(m, (*path, "match", j))
                src = rd.labels(mm.get("sourceLabels"), (*path, "match", j, "sourceLabels"))
                ns = mm.get("sourceNamespace")
                if any(settings.labels.get(k) != v for k, v in src.items()):
                    continue
                if ns is not None and ns != settings.namespace:
                    continue
                if not _applies_to_sidecar(rd, mm.get("gateways"), (*path, "match", j, "gateways")):
                    continue
                if j < len(route.matches):
                    kept.append(route.matches[j])
            if route.matches and not kept:
                continue  # every match block targets other proxies
            routes.append(dataclasses.replace(route, matches=tuple(kept)))
    return VirtualService(rd.r.name, rd.r.namespace, hosts, tuple(routes))


# -- DestinationRule ------------------------------------------------------------------------------------


def _parse_traffic_policy(rd: _Reader, value: Any, path: FieldPath, *, nested: bool = False) -> TrafficPolicy:
    """DR ``TrafficPolicy``; ``nested`` for a ``portLevelSettings`` entry (no port levels of its own)."""
    m = rd.mapping(value, path)
    lb = None
    if "loadBalancer" in m:
        lbm = rd.mapping(m.get("loadBalancer"), (*path, "loadBalancer"))
        simple = rd.string(lbm.get("simple"), (*path, "loadBalancer", "simple"), "LEAST_REQUEST")
        if simple == "UNSPECIFIED":
            simple = "LEAST_REQUEST"
        if simple == "LEAST_CONN":  # deprecated alias of LEAST_REQUEST
            simple = "LEAST_REQUEST"
        if simple not in ("LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"):
            rd.fail((*path, "loadBalancer", "simple"), f"unsupported load balancer {simple!r}")
            simple = "LEAST_REQUEST"
        ch = rd.mapping(lbm.get("consistentHash"), (*path, "loadBalancer", "consistentHash"))
        header = ""
        if ch:
            header = rd.string(
                ch.get("httpHeaderName"), (*path, "loadBalancer", "consistentHash", "httpHeaderName")
            )
            if not header:
                rd.fail((*path, "loadBalancer", "consistentHash"), "only httpHeaderName is supported")
        lb = LoadBalancerSettings(cast(Any, simple), header.lower())
    pool = None
    if "connectionPool" in m:
        cp = (*path, "connectionPool")
        cpm = rd.mapping(m.get("connectionPool"), cp)
        tcp = rd.mapping(cpm.get("tcp"), (*cp, "tcp"))
        http = rd.mapping(cpm.get("http"), (*cp, "http"))
        d = ConnectionPoolSettings()
        pool = ConnectionPoolSettings(
            max_connections=rd.integer(
                tcp.get("maxConnections"), (*cp, "tcp", "maxConnections"), d.max_connections, lo=1
            ),
            max_pending_requests=rd.integer(
                http.get("http1MaxPendingRequests"),
                (*cp, "http", "http1MaxPendingRequests"),
                d.max_pending_requests,
            ),
            max_requests=rd.integer(
                http.get("http2MaxRequests"), (*cp, "http", "http2MaxRequests"), d.max_requests, lo=1
            ),
            max_requests_per_connection=rd.integer(
                http.get("maxRequestsPerConnection"), (*cp, "http", "maxRequestsPerConnection"), 0
            ),
            connect_timeout=rd.duration(
                tcp.get("connectTimeout"), (*cp, "tcp", "connectTimeout"), minimum=0.001
            )
            or d.connect_timeout,
            idle_timeout=rd.duration(http.get("idleTimeout"), (*cp, "http", "idleTimeout"), minimum=0.001)
            or d.idle_timeout,
        )
    outlier = None
    if "outlierDetection" in m:
        op = (*path, "outlierDetection")
        om = rd.mapping(m.get("outlierDetection"), op)
        d2 = OutlierDetection()
        outlier = OutlierDetection(
            consecutive_5xx=rd.integer(
                om.get("consecutive5xxErrors"), (*op, "consecutive5xxErrors"), d2.consecutive_5xx
            ),
            consecutive_gateway_errors=rd.integer(
                om.get("consecutiveGatewayErrors"), (*op, "consecutiveGatewayErrors"), 0
            ),
            interval=rd.duration(om.get("interval"), (*op, "interval"), minimum=0.001) or d2.interval,
            base_ejection_time=rd.duration(
                om.get("baseEjectionTime"), (*op, "baseEjectionTime"), minimum=0.001
            )
            or d2.base_ejection_time,
            max_ejection_percent=rd.integer(
                om.get("maxEjectionPercent"), (*op, "maxEjectionPercent"), d2.max_ejection_percent, hi=100
            ),
        )
    tls = _parse_tls(rd, m.get("tls"), (*path, "tls")) if "tls" in m else None
    port_level: list[tuple[int, TrafficPolicy]] = []
    if "portLevelSettings" in m:
        if nested:
            rd.fail((*path, "portLevelSettings"), "a port-level policy cannot have portLevelSettings")
        for i, entry in enumerate(rd.seq(m.get("portLevelSettings"), (*path, "portLevelSettings"))):
            pp: FieldPath = (*path, "portLevelSettings", i)
            em = rd.mapping(entry, pp)
            selector = rd.mapping(em.get("port"), (*pp, "port"))
            if not selector.get("number"):
                rd.fail((*pp, "port", "number"), "port-level settings need a port number")
                continue
            number = rd.integer(selector.get("number"), (*pp, "port", "number"), 0, lo=1, hi=65535)
            sections = {k: v for k, v in em.items() if k != "port"}
            port_level.append((number, _parse_traffic_policy(rd, sections, pp, nested=True)))
    return TrafficPolicy(lb, pool, outlier, tls, tuple(port_level))


def _parse_tls(rd: _Reader, value: Any, path: FieldPath) -> TLSSettings:
    """DR ``ClientTLSSettings`` (DR l.942-1031), validated as istiod's ``validateTLS`` does.

    SDS (``credentialName``) and CRLs (``caCrl``) are not supported: the proxy reads PEM files only.
    """
    tm = rd.mapping(value, path)
    for key in sorted(set(tm) - _TLS_FIELDS, key=str):
        rd.fail((*path, str(key)), "unknown ClientTLSSettings field")
    mode = rd.string(tm.get("mode"), (*path, "mode"), "DISABLE")
    if mode not in _TLS_MODES:
        rd.fail((*path, "mode"), f"TLS mode {mode!r} is not supported ({', '.join(_TLS_MODES)})")
        mode = "DISABLE"
    if tm.get("credentialName"):
        rd.fail(
            (*path, "credentialName"),
            "credentialName (certificates from a Kubernetes secret over SDS) is not supported by this proxy: "
            "give caCertificates, clientCertificate and privateKey files",
        )
    if tm.get("caCrl"):
        rd.fail((*path, "caCrl"), "certificate revocation lists are not supported by this proxy")
    sans = tuple(
        rd.string(s, (*path, "subjectAltNames", i))
        for i, s in enumerate(rd.seq(tm.get("subjectAltNames"), (*path, "subjectAltNames")))
    )
    files = {
        key: rd.file_path(tm.get(key), (*path, key))
        for key in ("caCertificates", "clientCertificate", "privateKey")
    }
    insecure = rd.boolean(tm.get("insecureSkipVerify"), (*path, "insecureSkipVerify"), False)
    if mode in ("SIMPLE", "MUTUAL"):
        # IST validation.go validateTLS: skipping verification and naming what to verify contradict.
        if insecure and (files["caCertificates"] or sans):
            rd.fail(
                (*path, "insecureSkipVerify"),
                "cannot specify caCertificates or subjectAltNames when insecureSkipVerify is set true",
            )
        if mode == "MUTUAL":
            if not tm.get("clientCertificate"):
                rd.fail((*path, "clientCertificate"), "client certificate required for mutual tls")
            if not tm.get("privateKey"):
                rd.fail((*path, "privateKey"), "private key required for mutual tls")
    else:
        for key in ("caCertificates", "clientCertificate", "privateKey"):
            if tm.get(key):
                rd.fail((*path, key), f"used only with mode SIMPLE or MUTUAL (mode is {mode})")
    return TLSSettings(
        cast(Any, mode),
        sans,
        ca_certificates=files["caCertificates"],
        client_certificate=files["clientCertificate"],
        private_key=files["privateKey"],
        sni=rd.string(tm.get("sni"), (*path, "sni")),
        insecure_skip_verify=insecure,
    )


def _parse_destination_rule(rd: _Reader) -> DestinationRule:
    spec = rd.mapping(rd.r.spec, ("spec",))
    host = rd.string(spec.get("host"), ("spec", "host"))
    if not host:
        rd.fail(("spec", "host"), "host is required")
    subsets = []
    seen = set()
    for i, s in enumerate(rd.seq(spec.get("subsets"), ("spec", "subsets"))):
        sp: FieldPath = ("spec", "subsets", i)
        sm = rd.mapping(s, sp)
        name = rd.string(sm.get("name"), (*sp, "name"))
        if not name:
            rd.fail((*sp, "name"), "subset name is required")
        elif name in seen:
            rd.fail((*sp, "name"), f"duplicate subset {name!r}")
        seen.add(name)
        subsets.append(
            Subset(
                name,
                rd.labels(sm.get("labels"), (*sp, "labels")),
                _parse_traffic_policy(rd, sm.get("trafficPolicy"), (*sp, "trafficPolicy")),
            )
        )
    return DestinationRule(
        rd.r.name,
        rd.r.namespace,
        fqdn(host, rd.r.namespace),
        _parse_traffic_policy(rd, spec.get("trafficPolicy"), ("spec", "trafficPolicy")),
        tuple(subsets),
    )


# -- ServiceEntry, PeerAuthentication -------------------------------------------------------------------


def _parse_service_entry(rd: _Reader) -> ServiceEntry:
    spec = rd.mapping(rd.r.spec, ("spec",))
    hosts = tuple(
        fqdn(rd.string(h, ("spec", "hosts", i)), rd.r.namespace)
        for i, h in enumerate(rd.seq(spec.get("hosts"), ("spec", "hosts")))
    )
    if not hosts:
        rd.fail(("spec", "hosts"), "at least one host is required")
    ports = []
    for i, p in enumerate(rd.seq(spec.get("ports"), ("spec", "ports"))):
        pp: FieldPath = ("spec", "ports", i)
        pm = rd.mapping(p, pp)
        target = pm.get("targetPort")
        ports.append(
            ServicePort(
                rd.integer(pm.get("number"), (*pp, "number"), 0, lo=1, hi=65535),
                rd.string(pm.get("name"), (*pp, "name")),
                rd.string(pm.get("protocol"), (*pp, "protocol"), "HTTP").upper(),
                rd.integer(target, (*pp, "targetPort"), 0, lo=1, hi=65535) if target is not None else None,
            )
        )
    resolution = rd.string(spec.get("resolution"), ("spec", "resolution"), "NONE")
    if resolution not in ("NONE", "STATIC", "DNS"):
        rd.fail(("spec", "resolution"), "must be NONE, STATIC or DNS")
        resolution = "NONE"
    endpoints = []
    for i, e in enumerate(rd.seq(spec.get("endpoints"), ("spec", "endpoints"))):
        ep: FieldPath = ("spec", "endpoints", i)
        em = rd.mapping(e, ep)
        address = rd.string(em.get("address"), (*ep, "address"))
        if not address:
            rd.fail((*ep, "address"), "address is required")
        eports = {}
        for k, v in rd.mapping(em.get("ports"), (*ep, "ports")).items():
            eports[k] = rd.integer(v, (*ep, "ports", k), 0, lo=1, hi=65535)
        endpoints.append(
            WorkloadEndpoint(
                address,
                eports,
                rd.labels(em.get("labels"), (*ep, "labels")),
                rd.string(em.get("serviceAccount"), (*ep, "serviceAccount")),
                # uint32; 0 = unset: istiod then leaves Envoy's load_balancing_weight unset, i.e. 1
                rd.integer(em.get("weight"), (*ep, "weight"), 1, lo=0) or 1,
            )
        )
    if resolution == "STATIC" and not endpoints:
        rd.fail(("spec", "endpoints"), "resolution STATIC needs endpoints")
    return ServiceEntry(
        rd.r.name, rd.r.namespace, hosts, tuple(ports), cast(Any, resolution), tuple(endpoints)
    )


def _parse_peer_authentication(rd: _Reader) -> PeerAuthentication:
    spec = rd.mapping(rd.r.spec, ("spec",))
    selector = None
    if spec.get("selector") is not None:
        sel = rd.mapping(spec.get("selector"), ("spec", "selector"))
        selector = rd.labels(sel.get("matchLabels"), ("spec", "selector", "matchLabels"))
    mtls = rd.mapping(spec.get("mtls"), ("spec", "mtls"))
    mode = rd.string(mtls.get("mode"), ("spec", "mtls", "mode"), "UNSET")
    modes = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
    if mode not in modes:
        rd.fail(("spec", "mtls", "mode"), f"must be one of {', '.join(modes)}")
        mode = "UNSET"
    port_level = {}
    for k, v in rd.mapping(spec.get("portLevelMtls"), ("spec", "portLevelMtls")).items():
        pm = rd.string(
            rd.mapping(v, ("spec", "portLevelMtls", k)).get("mode"), ("spec", "portLevelMtls", k, "mode")
        )
        if not str(k).isdigit() or pm not in modes:
            rd.fail(("spec", "portLevelMtls", k), "needs a port number and a valid mode")
            continue
        port_level[int(k)] = pm
    return PeerAuthentication(rd.r.name, rd.r.namespace, selector, cast(Any, mode), port_level)


# -- ProxyConfig ----------------------------------------------------------------------------------------


def _listener(rd: _Reader, value: Any, path: FieldPath) -> ListenerSettings | None:
    if value is None:
        return None
    m = rd.mapping(value, path)
    return ListenerSettings(
        rd.string(m.get("address"), (*path, "address"), "127.0.0.1"),
        rd.integer(m.get("port"), (*path, "port"), 0, hi=65535),
    )


def _parse_proxy_config(rd: _Reader, base: Path | None) -> ProxySettings:
    spec = rd.mapping(rd.r.spec, ("spec",))

    def rel(p: str) -> str:
        return str((base / p) if base is not None and not Path(p).is_absolute() else Path(p))

    identity = None
    if spec.get("identity") is not None:
        im = rd.mapping(spec.get("identity"), ("spec", "identity"))
        cert_dir = rd.string(im.get("certDir"), ("spec", "identity", "certDir"))
        files = {}
        for key in ("cert", "key", "bundle", "chain"):
            default = f"{cert_dir}/{key}.pem" if cert_dir else ""
            files[key] = rd.string(im.get(key), ("spec", "identity", key), default)
        for key in ("cert", "key", "bundle"):
            if not files[key]:
                rd.fail(("spec", "identity", key), "required (or set certDir)")
        identity = IdentityFiles(
            rel(files["cert"]),
            rel(files["key"]),
            rel(files["bundle"]),
            rel(files["chain"]) if files["chain"] else "",
        )
    am = rd.mapping(spec.get("authorizer"), ("spec", "authorizer"))
    mode = rd.string(am.get("mode"), ("spec", "authorizer", "mode"), "none")
    if mode not in ("local", "remote", "none"):
        rd.fail(("spec", "authorizer", "mode"), "must be local, remote or none")
        mode = "none"
    address = rd.string(am.get("address"), ("spec", "authorizer", "address"))
    if mode == "remote" and not address:
        rd.fail(("spec", "authorizer", "address"), "remote mode needs an address")
    authorizer = AuthorizerSettings(
        mode=cast(Any, mode),
        address=address,
        timeout=rd.duration(am.get("timeout"), ("spec", "authorizer", "timeout"), minimum=0.001) or 0.2,
        fail_open=rd.boolean(am.get("failOpen"), ("spec", "authorizer", "failOpen"), False),
        status_on_error=rd.integer(
            am.get("statusOnError"), ("spec", "authorizer", "statusOnError"), 403, lo=400, hi=599
        ),
        policy_paths=tuple(
            rel(rd.string(p, ("spec", "authorizer", "policies", i)))
            for i, p in enumerate(rd.seq(am.get("policies"), ("spec", "authorizer", "policies")))
        ),
    )
    norm_path = ("spec", "pathNormalization", "normalization")
    norm_name = rd.string(
        rd.mapping(spec.get("pathNormalization"), norm_path[:2]).get("normalization"), norm_path, "BASE"
    )
    norm_name = "BASE" if norm_name == "DEFAULT" else norm_name  # meshConfig: DEFAULT is an alias of BASE
    if norm_name not in PathNormalization.__members__:
        rd.fail(norm_path, "must be NONE, BASE, DEFAULT, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES")
        norm_name = "BASE"
    wm = rd.mapping(spec.get("workload"), ("spec", "workload"))
    inbound = rd.mapping(spec.get("inbound"), ("spec", "inbound"))
    fcc_path = ("spec", "inbound", "forwardClientCertDetails")
    forward = rd.string(inbound.get("forwardClientCertDetails"), fcc_path, "SANITIZE_SET")
    if forward not in get_args(ForwardClientCert):
        rd.fail(fcc_path, f"must be one of {', '.join(get_args(ForwardClientCert))}")
        forward = "SANITIZE_SET"
    det_path = ("spec", "inbound", "setCurrentClientCertDetails")
    details = rd.mapping(inbound.get("setCurrentClientCertDetails"), det_path)
    for key in details:
        if key == "chain":
            # Envoy's Chain is every certificate the peer sent; Python's ssl (3.11) exposes only the leaf.
            rd.fail((*det_path, "chain"), "chain is not supported (the peer's chain is not available here)")
        elif key not in ("subject", "cert", "uri", "dns"):
            rd.fail((*det_path, str(key)), "supported details are subject, cert, uri and dns")
    # Absent: what istiod sets on sidecar inbound (Subject, URI, DNS). Given: Envoy's proto, unset = false.
    given = inbound.get("setCurrentClientCertDetails") is not None
    client_cert = ClientCertDetails(
        cast(Any, forward),
        subject=rd.boolean(details.get("subject"), (*det_path, "subject"), not given),
        uri=rd.boolean(details.get("uri"), (*det_path, "uri"), not given),
        dns=rd.boolean(details.get("dns"), (*det_path, "dns"), not given),
        cert=rd.boolean(details.get("cert"), (*det_path, "cert"), False),
    )
    return ProxySettings(
        namespace=rd.string(wm.get("namespace"), ("spec", "workload", "namespace"), rd.r.namespace),
        labels=rd.labels(wm.get("labels"), ("spec", "workload", "labels")),
        service_account=rd.string(
            wm.get("serviceAccount"), ("spec", "workload", "serviceAccount"), "default"
        ),
        trust_domain=rd.string(spec.get("trustDomain"), ("spec", "trustDomain"), DEFAULT_TRUST_DOMAIN),
        root_namespace=rd.string(spec.get("rootNamespace"), ("spec", "rootNamespace"), "istio-system"),
        inbound=_listener(rd, spec.get("inbound"), ("spec", "inbound")),
        app_address=rd.string(inbound.get("appAddress"), ("spec", "inbound", "appAddress"), "127.0.0.1"),
        app_port=rd.integer(inbound.get("appPort"), ("spec", "inbound", "appPort"), 0, hi=65535),
        outbound=_listener(rd, spec.get("outbound"), ("spec", "outbound")),
        admin=_listener(rd, spec.get("admin"), ("spec", "admin")),
        identity=identity,
        authorizer=authorizer,
        replay_buffer_bytes=rd.integer(
            spec.get("replayBufferBytes"), ("spec", "replayBufferBytes"), 64 * 1024
        ),
        mirror_concurrency=rd.integer(spec.get("mirrorConcurrency"), ("spec", "mirrorConcurrency"), 64, lo=1),
        access_log=rd.boolean(spec.get("accessLog"), ("spec", "accessLog"), True),
        client_cert=client_cert,
        path_normalization=PathNormalization[norm_name],
    )


# -- entry points ---------------------------------------------------------------------------------------


def parse_resources(
    resources: Iterable[Resource], settings: ProxySettings | None = None, *, base: Path | None = None
) -> SidecarConfig:
    """Validate every known kind; collect all errors and raise :class:`ConfigErrors` if there are any."""
    errors: list[ConfigError] = []
    items = list(resources)
    found_settings = None
    for r in items:
        if r.kind == "ProxyConfig" and r.api_version != PROXY_VERSION:
            # Ignoring it would start a proxy with no listeners and say nothing.
            errors.append(r.error(("apiVersion",), f"ProxyConfig is {PROXY_VERSION}"))
            continue
        if r.kind == "ProxyConfig":
            if found_settings is not None:
                errors.append(r.error(("kind",), "only one ProxyConfig is allowed"))
                continue
            found_settings = _parse_proxy_config(_Reader(r, errors), base)
    eff = found_settings or settings or ProxySettings()
    vss, drs, ses, pas = [], [], [], []
    for r in items:
        rd = _Reader(r, errors, base)
        if r.api_version in NETWORKING_VERSIONS:
            if r.kind == "VirtualService":
                vss.append(_parse_virtual_service(rd, eff))
            elif r.kind == "DestinationRule":
                drs.append(_parse_destination_rule(rd))
            elif r.kind == "ServiceEntry":
                ses.append(_parse_service_entry(rd))
        elif r.api_version in SECURITY_VERSIONS and r.kind == "PeerAuthentication":
            pas.append(_parse_peer_authentication(rd))
    if errors:
        raise ConfigErrors(errors)
    mesh = MeshView(tuple(vss), tuple(drs), tuple(ses), tuple(pas))
    return SidecarConfig(eff, mesh)


def parse_mesh(resources: Iterable[Resource], settings: ProxySettings | None = None) -> SidecarConfig:
    """Alias of :func:`parse_resources` for callers that hold parsed resources."""
    return parse_resources(resources, settings)


def load_sidecar_config(path: Path) -> SidecarConfig:
    """Load ``path`` (a file or folder) plus any ``spec.include`` of its ProxyConfig. Raises ConfigErrors."""
    resources = load_resources([path])
    extra: list[Path] = []
    base = path.parent if path.is_file() else path
    for r in resources:
        if r.kind == "ProxyConfig" and r.api_version == PROXY_VERSION and isinstance(r.spec, Mapping):
            inc = r.spec.get("include") or []
            if not isinstance(inc, list) or not all(isinstance(p, str) for p in inc):
                raise ConfigErrors([r.error(("spec", "include"), "must be a list of paths")])
            extra.extend(base / p for p in inc)
    if extra:
        resources.extend(load_resources(extra))
    return parse_resources(resources, base=base)

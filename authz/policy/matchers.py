"""Istio's value matchers, as Envoy evaluates what istiod generates for them.

Each function here turns one policy value into a predicate, following istio
``pilot/pkg/security/authz/matcher/{string,header,template}.go`` and ``model/generator.go``, and the
Envoy matcher the result compiles to. :class:`RequestView` extracts the attributes of one request
lazily (a missing attribute is ``None``: a positive matcher on it is false, a negated one true).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from authz.config import MeshConfig
from authz.policy.model import MATCH_ANY_TEMPLATE, MATCH_ONE_TEMPLATE, FieldMatch
from authz.request import Request, RequestAuth

__all__ = [
    "SPIFFE_PREFIX",
    "RequestView",
    "StringPredicate",
    "ValuePredicate",
    "claim_values",
    "expand_trust_domains",
    "header_matcher",
    "istio_string_matcher",
    "namespace_matcher",
    "path_matcher",
    "principal_matcher",
    "replace_trust_domain_aliases",
    "request_principal_matcher",
    "service_account_matcher",
    "trust_domain_matcher",
    "value_predicate",
]

SPIFFE_PREFIX = "spiffe://"
DEFAULT_CLUSTER_LOCAL = "cluster.local"  # istio pkg/config/constants DefaultClusterLocalDomain

StringPredicate = Callable[[str], bool]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _non_empty(s: str) -> bool:
    return s != ""


def istio_string_matcher(value: str, *, ignore_case: bool = False, prefix: str = "") -> StringPredicate:
    """istio matcher/string.go ``StringMatcherWithPrefix``: the leading ``*`` is checked first.

    ``*`` -> regex ``.+`` (non-empty, prefix NOT applied); ``*abc`` -> suffix (with a prefix:
    regex ``prefix.*abc``); ``abc*`` -> prefix; anything else exact. A ``*`` in the middle is literal.
    """
    if value == "*":
        return _non_empty
    if value.startswith("*"):
        suffix = value[1:]
        if prefix:
            need = len(prefix) + len(suffix)
            return lambda s: len(s) >= need and s.startswith(prefix) and s.endswith(suffix)
        if ignore_case:
            low = suffix.lower()
            return lambda s: s.lower().endswith(low)
        return lambda s: s.endswith(suffix)
    if value.endswith("*"):
        head = prefix + value[:-1]
        if ignore_case:
            low = head.lower()
            return lambda s: s.lower().startswith(low)
        return lambda s: s.startswith(head)
    exact = prefix + value
    if ignore_case:
        low = exact.lower()
        return lambda s: s.lower() == low
    return lambda s: s == exact


def header_matcher(value: str, *, ignore_case: bool = False) -> Callable[[str | None], bool]:
    """istio matcher/header.go ``HeaderMatcher``/``HostMatcher``: ``*`` is Envoy ``present_match``
    (the header exists, even with an empty value); otherwise suffix/prefix/exact on the value."""
    if value == "*":
        return lambda s: s is not None
    inner = istio_string_matcher(value, ignore_case=ignore_case)
    return lambda s: s is not None and inner(s)


# Envoy uri_template (istio matcher/template.go): `{*}` is one non-empty segment of pchars, `{**}` is
# zero or more pchars or '/'.
_PCHAR = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]"


def path_matcher(value: str) -> StringPredicate:
    """istio generator.go ``pathGenerator``: a template if it contains ``{*}``/``{**}``, else
    ``PathMatcher`` (the istio string matcher, case-sensitive)."""
    if MATCH_ONE_TEMPLATE not in value and MATCH_ANY_TEMPLATE not in value:
        return istio_string_matcher(value)
    parts: list[str] = []
    for piece in re.split(r"(\{\*\*\}|\{\*\})", value):
        if piece == MATCH_ANY_TEMPLATE:
            parts.append(f"(?:{_PCHAR}|/)*")
        elif piece == MATCH_ONE_TEMPLATE:
            parts.append(f"{_PCHAR}+")
        else:
            parts.append(re.escape(piece))
    rx = re.compile("".join(parts))
    return lambda s: rx.fullmatch(s) is not None


def _regex_from_istio(value: str) -> str:
    """Istio puts namespaces/service accounts into regexes unquoted; namespace and service account
    names only contain ``[a-z0-9-.]``, so quote everything except ``.`` (regex any) and ``*``."""
    out = []
    for ch in value:
        if ch == "*":
            out.append(".*")
        elif ch == ".":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def namespace_matcher(value: str) -> StringPredicate:
    """istio generator.go ``srcNamespaceGenerator``: regex ``.*/ns/<v, * -> .*>/.*`` on the principal."""
    rx = re.compile(f".*/ns/{_regex_from_istio(value)}/.*")
    return lambda s: rx.fullmatch(s) is not None


def service_account_matcher(value: str, policy_namespace: str) -> StringPredicate:
    """istio generator.go ``serviceAccountRegex``: ``spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?``;
    ``<sa>`` alone means the policy's namespace."""
    ns, sep, sa = value.partition("/")
    if not sep:
        ns, sa = policy_namespace, value
    rx = re.compile(f"spiffe://.+/ns/{_regex_from_istio(ns)}/(.+/|)sa/{_regex_from_istio(sa)}(/.+)?")
    return lambda s: rx.fullmatch(s) is not None


def trust_domain_matcher(value: str) -> StringPredicate:
    """Trust domain of the peer SPIFFE ID (istio generator.go ``srcTrustDomainGenerator``):
    ``td`` -> prefix ``spiffe://td/``; ``*`` -> prefix ``spiffe://``; ``cluster.*`` ->
    ``spiffe://cluster\\.[^/]*/.*``; ``*local`` -> ``spiffe://[^/]*local/.*``."""
    if value == "*":
        return lambda s: s.startswith(SPIFFE_PREFIX)
    if value.startswith("*"):
        rx = re.compile(f"spiffe://[^/]*{re.escape(value[1:])}/.*")
        return lambda s: rx.fullmatch(s) is not None
    if value.endswith("*"):
        rx = re.compile(f"spiffe://{re.escape(value[:-1])}[^/]*/.*")
        return lambda s: rx.fullmatch(s) is not None
    head = f"{SPIFFE_PREFIX}{value}/"
    return lambda s: s.startswith(head)


def principal_matcher(value: str) -> StringPredicate:
    """istio generator.go ``srcPrincipalGenerator``: ``StringMatcherWithPrefix(v, "spiffe://")``."""
    return istio_string_matcher(value, prefix=SPIFFE_PREFIX)


# -- trust domain aliasing (istio pilot/pkg/security/trustdomain/bundle.go, util.go) --------------------


def _prefix_match(a: str, pattern: str) -> bool:
    return pattern.endswith("*") and a.startswith(pattern[:-1])


def _suffix_match(a: str, pattern: str) -> bool:
    return pattern.startswith("*") and a.endswith(pattern[1:])


def _td_string_match(a: str, trust_domains: Sequence[str]) -> bool:
    """istio trustdomain/util.go ``stringMatch``: the pattern may be on either side."""
    return any(
        s in (a, "*")
        or _prefix_match(a, s)
        or _prefix_match(s, a)
        or _suffix_match(a, s)
        or _suffix_match(s, a)
        for s in trust_domains
    )


def replace_trust_domain_aliases(principals: Sequence[str], mesh: MeshConfig) -> tuple[str, ...]:
    """istio trustdomain/bundle.go ``ReplaceTrustDomainAliases`` (applied by model.go
    ``MigrateTrustDomain`` to principals, notPrincipals and source.principal).

    A ``<td>/ns/<n>/sa/<s>`` principal whose trust domain is the mesh trust domain, an alias or
    ``cluster.local`` (a pointer to the local trust domain) is expanded to every trust domain of
    the bundle. ``*`` trust domains and non-5-part values are kept as they are.
    """
    bundle = (mesh.trust_domain, *mesh.trust_domain_aliases)
    out: list[str] = []
    for principal in principals:
        parts = principal.split("/")
        if len(parts) != 5 or parts[0] == "*":
            out.append(principal)
            continue
        td = parts[0]
        if not (_td_string_match(td, bundle) or td == DEFAULT_CLUSTER_LOCAL):
            out.append(principal)
            continue
        expanded: list[str] = []
        for alias in bundle:
            new = principal if _suffix_match(alias, td) else "/".join((alias, *parts[1:]))
            if new not in expanded:
                expanded.append(new)
        out.extend(expanded)
    return tuple(out)


def expand_trust_domains(values: Sequence[str], mesh: MeshConfig) -> tuple[str, ...]:
    """istio trustdomain/bundle.go ``ExpandTrustDomainAliases``."""
    bundle = (mesh.trust_domain, *mesh.trust_domain_aliases)
    out: list[str] = []
    for v in values:
        for x in bundle if v in bundle else (v,):
            if x not in out:
                out.append(x)
    return tuple(out)


# -- request principals and claims ---------------------------------------------------------------------


def _claim_string_predicate(value: str) -> StringPredicate:
    return istio_string_matcher(value)


def request_principal_matcher(value: str) -> Callable[[RequestAuth | None], bool]:
    """istio generator.go ``requestPrincipalGenerator.extendedPrincipal``: split on the LAST ``/``
    into an ``iss`` and a ``sub`` matcher, each on the string claim (spec §1.8.4 table)."""
    idx = value.rfind("/")
    found = idx >= 0
    iss, sub = (value[:idx], value[idx + 1 :]) if found else (value, "")

    def exact(x: str) -> StringPredicate:
        return lambda s: s == x

    def suffix(x: str) -> StringPredicate:
        return lambda s: s.endswith(x)

    def prefix(x: str) -> StringPredicate:
        return lambda s: s.startswith(x)

    match_iss: StringPredicate
    match_sub: StringPredicate
    if value == "*":
        match_iss = match_sub = _non_empty
    elif value.startswith("*"):
        if found:
            match_iss = _non_empty if iss == "*" else suffix(iss[1:])
            match_sub = exact(sub)
        else:
            match_iss, match_sub = _non_empty, suffix(value[1:])
    elif value.endswith("*"):
        if found:
            match_iss = exact(iss)
            match_sub = _non_empty if sub == "*" else prefix(sub[:-1])
        else:
            match_iss, match_sub = prefix(value[:-1]), _non_empty
    else:
        match_iss, match_sub = exact(iss), exact(sub)

    def matches(auth: RequestAuth | None) -> bool:
        if auth is None:
            return False
        i, s = auth.claims.get("iss"), auth.claims.get("sub")
        return isinstance(i, str) and isinstance(s, str) and match_iss(i) and match_sub(s)

    return matches


_MISSING = object()


def claim_values(auth: RequestAuth | None, path: Sequence[str]) -> list[str] | None:
    """The string values of the claim at ``path`` as Envoy's metadata matcher sees them
    (istio model/util.go ``MetadataListValueMatcherForJWTClaims``: the claim is a string, or a list
    whose string elements are compared). Top-level claims named in ``auth.space_delimited`` are
    split on whitespace first (Envoy ``normalize_payload_in_metadata``). ``None`` if missing."""
    if auth is None or not path:
        return None
    node: Any = auth.claims
    for name in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(name, _MISSING)
        if node is _MISSING:
            return None
    if isinstance(node, str):
        if len(path) == 1 and path[0] in auth.space_delimited:
            return node.split()
        return [node]
    if isinstance(node, list):
        return [x for x in node if isinstance(x, str)]
    return None  # numbers, booleans and objects never match (istio issue #39703)


# -- the request, seen as Istio attributes --------------------------------------------------------------


def _parse_ip(text: str) -> IpAddress | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class RequestView:
    """Istio attributes of one request, computed on first use (spec §2.1)."""

    __slots__ = ("_ips", "auth", "http", "path", "request")

    def __init__(self, request: Request, auth: RequestAuth | None, path: str) -> None:
        self.request = request
        self.http = request.http
        self.auth = auth
        self.path = path
        self._ips: dict[str, IpAddress | None] = {}

    @property
    def principal(self) -> str | None:
        return self.request.source.principal or None

    def ip(self, which: str) -> IpAddress | None:
        if which not in self._ips:
            r = self.request
            if which == "source.ip":
                text = r.source.address
            elif which == "remote.ip":
                text = r.remote_ip or r.source.address
            else:
                text = r.destination.address
            self._ips[which] = _parse_ip(text)
        return self._ips[which]

    def header(self, name: str) -> str | None:
        http = self.http
        if http is None:
            return None
        value = http.headers.get(name)
        if value is not None:
            return value
        if name == ":method":
            return http.method
        if name == ":authority":
            return http.host or None
        if name == ":path":
            return http.path
        if name == ":scheme":
            return http.scheme
        return None

    @property
    def host(self) -> str | None:
        return (self.http.host or None) if self.http is not None else None

    @property
    def method(self) -> str | None:
        return self.http.method if self.http is not None else None

    @property
    def url_path(self) -> str | None:
        return self.path if self.http is not None else None


ValuePredicate = Callable[[RequestView], bool]


def _ip_predicate(value: str, which: str) -> ValuePredicate:
    net = ipaddress.ip_network(value, strict=False)

    def matches(view: RequestView) -> bool:
        ip = view.ip(which)
        return ip is not None and ip.version == net.version and ip in net

    return matches


def _string_attr(get: Callable[[RequestView], str | None], pred: StringPredicate) -> ValuePredicate:
    def matches(view: RequestView) -> bool:
        s = get(view)
        return s is not None and pred(s)

    return matches


def _metadata_value(view: RequestView, filter_name: str, key: str) -> Any:
    meta = view.request.metadata.get(filter_name)
    if isinstance(meta, Mapping):
        return meta.get(key)
    return None


def value_predicate(
    fm: FieldMatch, value: str, *, policy_namespace: str, mesh: MeshConfig
) -> list[ValuePredicate]:
    """Predicates for one policy value of ``fm`` (several when trust-domain aliases expand it)."""
    attribute = fm.attribute
    if attribute == "source.principal":
        return [
            _string_attr(lambda v: v.principal, principal_matcher(x))
            for x in replace_trust_domain_aliases([value], mesh)
        ]
    if attribute == "source.namespace":
        return [_string_attr(lambda v: v.principal, namespace_matcher(value))]
    if attribute == "source.serviceAccount":
        return [_string_attr(lambda v: v.principal, service_account_matcher(value, policy_namespace))]
    if attribute == "source.trustDomain":
        return [
            _string_attr(lambda v: v.principal, trust_domain_matcher(x))
            for x in expand_trust_domains([value], mesh)
        ]
    if attribute in ("source.ip", "remote.ip", "destination.ip"):
        return [_ip_predicate(value, attribute)]
    if attribute == "destination.port":
        port = int(value)
        return [lambda v: v.request.destination.port == port and port != 0]
    if attribute == "request.host":
        hm = header_matcher(value, ignore_case=True)
        return [lambda v: hm(v.host)]
    if attribute == "request.method":
        mm = header_matcher(value)
        return [lambda v: mm(v.method)]
    if attribute == "request.path":
        return [_string_attr(lambda v: v.url_path, path_matcher(value))]
    if attribute == "request.headers":
        name = fm.key[0]
        hdr = header_matcher(value)
        return [lambda v: hdr(v.header(name))]
    if attribute == "request.auth.principal":
        rp = request_principal_matcher(value)
        return [lambda v: v.http is not None and rp(v.auth)]
    if attribute in ("request.auth.audiences", "request.auth.presenter", "request.auth.claims"):
        path: tuple[str, ...] = {
            "request.auth.audiences": ("aud",),
            "request.auth.presenter": ("azp",),
        }.get(attribute, fm.key)
        sp = _claim_string_predicate(value)

        def claim(v: RequestView) -> bool:
            if v.http is None:
                return False
            found = claim_values(v.auth, path)
            return found is not None and any(sp(x) for x in found)

        return [claim]
    if attribute == "connection.sni":
        return [_string_attr(lambda v: v.request.sni or None, istio_string_matcher(value))]
    if attribute == "experimental.envoy.filters":
        filter_name, key = fm.key
        if value.startswith("[") and value.endswith("]"):
            inner = istio_string_matcher(value.strip("[]"))

            def in_list(v: RequestView) -> bool:
                got = _metadata_value(v, filter_name, key)
                return isinstance(got, list) and any(isinstance(x, str) and inner(x) for x in got)

            return [in_list]
        sm = istio_string_matcher(value)

        def is_string(v: RequestView) -> bool:
            got = _metadata_value(v, filter_name, key)
            return isinstance(got, str) and sm(got)

        return [is_string]
    raise ValueError(f"unknown attribute {attribute}")  # the loader rejects these

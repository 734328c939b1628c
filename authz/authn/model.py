"""Istio ``RequestAuthentication`` (security.istio.io v1/v1beta1): parsed, validated, selected.

Validation replicates the istiod webhook (istio ``pkg/config/validation/validation.go``
``ValidateRequestAuthentication`` / ``validateJwtRule``) and the CRD schema; every mistake becomes a
:class:`ConfigError` naming file:line:field, and all of them are raised together as :class:`ConfigErrors`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from authz.authn._fields import FieldReader
from authz.authn.jwk import JwksError, parse_jwks
from authz.errors import ConfigError, ConfigErrors
from authz.request import Workload
from authz.resources import FieldPath, Resource
from authz.workload import selects

__all__ = [
    "API_VERSIONS",
    "DEFAULT_JWKS_TIMEOUT",
    "DEFAULT_LOCATIONS",
    "KIND",
    "ClaimToHeader",
    "JwtHeader",
    "JwtRule",
    "RequestAuthentication",
    "jwt_rules_for",
    "load_request_authentications",
    "parse_request_authentication",
]

KIND = "RequestAuthentication"
API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DEFAULT_JWKS_TIMEOUT = 5.0  # istio api JWTRule.timeout: "Default value is 5 seconds"
MAX_SPACE_DELIMITED_CLAIMS = 64  # CRD maxItems on spaceDelimitedClaims
DRY_RUN_ANNOTATION = "istio.io/dry-run"
# istio validation.go ValidateStrictHTTPHeaderName, applied to outputClaimToHeaders[].header
_STRICT_HEADER_RE = re.compile(r"^[-_A-Za-z0-9]+$")

_SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "jwtRules")
_RULE_FIELDS = (
    "issuer",
    "audiences",
    "jwksUri",
    "jwks",
    "fromHeaders",
    "fromParams",
    "fromCookies",
    "outputPayloadToHeader",
    "forwardOriginalToken",
    "outputClaimToHeaders",
    "timeout",
    "spaceDelimitedClaims",
)


@dataclass(frozen=True, slots=True)
class JwtHeader:
    """A header token location. ``name`` is lower case; ``prefix`` is case-sensitive (``Bearer ``)."""

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    """``outputClaimToHeaders[]``: copy ``claim`` (``.``-separated path) into request header ``header``."""

    header: str
    claim: str


DEFAULT_LOCATIONS = (JwtHeader("authorization", "Bearer "),)
"""Envoy ``extractor.cc`` ``addProvider``: used only when a rule names no header, param or cookie."""
DEFAULT_PARAMS = ("access_token",)
_FINGERPRINT_FIELDS = (
    "issuer",
    "audiences",
    "jwks_uri",
    "jwks",
    "from_headers",
    "from_params",
    "from_cookies",
    "output_payload_to_header",
    "forward_original_token",
    "output_claim_to_headers",
    "timeout",
    "space_delimited_claims",
)


@dataclass(frozen=True)
class JwtRule:
    """One ``jwtRules[]`` entry. ``origin`` names where it came from (``ns/name.jwtRules[i]``).

    ``headers``/``params``/``cookies`` are the effective token locations (the Envoy defaults filled
    in when none was configured). ``fingerprint`` is a stable digest of everything that affects
    verification, used to key the verified-token cache.
    """

    issuer: str = ""
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: float = DEFAULT_JWKS_TIMEOUT
    space_delimited_claims: tuple[str, ...] = ()
    origin: str = ""
    fingerprint: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        values = tuple(getattr(self, f) for f in _FINGERPRINT_FIELDS)
        digest = hashlib.sha256(repr(values).encode()).hexdigest()[:32]
        object.__setattr__(self, "fingerprint", digest)

    def __hash__(self) -> int:
        # Cheap and stable: rule tuples key per-workload caches on the hot path.
        return hash(self.fingerprint)

    @property
    def uses_default_locations(self) -> bool:
        return not (self.from_headers or self.from_params or self.from_cookies)

    @property
    def headers(self) -> tuple[JwtHeader, ...]:
        return DEFAULT_LOCATIONS if self.uses_default_locations else self.from_headers

    @property
    def params(self) -> tuple[str, ...]:
        return DEFAULT_PARAMS if self.uses_default_locations else self.from_params

    @property
    def cookies(self) -> tuple[str, ...]:
        return self.from_cookies

    @property
    def space_delimited(self) -> frozenset[str]:
        """Claims split on whitespace for matching: ``scope``, ``permission`` and the rule's own
        (istio ``policy_applier.go`` ``buildSpaceDelimitedClaims``)."""
        return frozenset({"scope", "permission", *self.space_delimited_claims})


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    name: str
    namespace: str
    match_labels: Mapping[str, str] | None
    has_target_refs: bool
    jwt_rules: tuple[JwtRule, ...]
    file: str = ""
    line: int = 0

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


def load_request_authentications(resources: Iterable[Resource]) -> list[RequestAuthentication]:
    """Parse every ``RequestAuthentication`` in ``resources`` (other kinds are ignored).

    Raises :class:`ConfigErrors` with every mistake found (also duplicate namespace/name).
    """
    errors: list[ConfigError] = []
    out: list[RequestAuthentication] = []
    seen: set[tuple[str, str]] = set()
    for res in resources:
        if res.kind != KIND or not res.api_version.startswith("security.istio.io/"):
            continue
        before = len(errors)
        ra = _parse(res, errors)
        if (res.namespace, res.name) in seen:
            errors.append(res.error(("metadata", "name"), "duplicate RequestAuthentication"))
        seen.add((res.namespace, res.name))
        if len(errors) == before:
            out.append(ra)
    if errors:
        raise ConfigErrors(errors)
    return out


def parse_request_authentication(resource: Resource) -> RequestAuthentication:
    """Parse one resource. Raises :class:`ConfigErrors`."""
    errors: list[ConfigError] = []
    ra = _parse(resource, errors)
    if errors:
        raise ConfigErrors(errors)
    return ra


def jwt_rules_for(
    ras: Sequence[RequestAuthentication], workload: Workload, *, root_namespace: str
) -> tuple[JwtRule, ...]:
    """All jwtRules of every RequestAuthentication that selects ``workload``, sorted by issuer.

    istio ``pilot/pkg/model/authentication.go`` ``getConfigsForWorkload`` (root namespace + workload
    namespace, selector subset match) and ``policy_applier.go`` ``newPolicyApplier`` (rules of all
    matching policies concatenated and sorted by issuer, stable). Policies with ``targetRefs`` attach
    to gateways/waypoints only, so a sidecar workload ignores them (``ShouldAttachPolicy``).
    """
    rules: list[JwtRule] = []
    for ra in ras:
        if ra.has_target_refs:
            continue
        if selects(ra.namespace, ra.match_labels, workload, root_namespace=root_namespace):
            rules.extend(ra.jwt_rules)
    rules.sort(key=lambda r: r.issuer)
    return tuple(rules)


def _parse(res: Resource, errors: list[ConfigError]) -> RequestAuthentication:
    reader = FieldReader(res, errors)
    if res.api_version not in API_VERSIONS:
        reader.fail(("apiVersion",), f"unsupported apiVersion {res.api_version!r} (use {API_VERSIONS[0]})")
    if DRY_RUN_ANNOTATION in res.annotations:
        # istio validation_test.go "dry run annotation not supported" for RequestAuthentication
        reader.fail(("metadata", "annotations", DRY_RUN_ANNOTATION), "dry-run is not supported here")
    spec = reader.mapping(res.spec, ("spec",), _SPEC_FIELDS)
    present = [k for k in ("selector", "targetRef", "targetRefs") if spec.get(k) is not None]
    if len(present) > 1:
        # CRD CEL rule: only one of selector, targetRef, targetRefs
        reader.fail(("spec", present[1]), f"only one of selector, targetRef, targetRefs (has {present})")
    match_labels = _selector(reader, spec.get("selector"))
    has_target_refs = bool(spec.get("targetRef") or spec.get("targetRefs"))
    rules = tuple(
        _rule(reader, path, item, origin=f"{res.namespace}/{res.name}.jwtRules[{path[-1]}]")
        for path, item in reader.objects(spec, "jwtRules", ("spec",))
    )
    return RequestAuthentication(
        name=res.name,
        namespace=res.namespace,
        match_labels=match_labels,
        has_target_refs=has_target_refs,
        jwt_rules=rules,
        file=res.file,
        line=res.line,
    )


def _selector(reader: FieldReader, value: Any) -> Mapping[str, str] | None:
    sel = reader.mapping(value, ("spec", "selector"), ("matchLabels",))
    labels = sel.get("matchLabels")
    if labels is None:
        return None
    path: FieldPath = ("spec", "selector", "matchLabels")
    if not isinstance(labels, Mapping):
        reader.fail(path, "must map label names to values")
        return None
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not k or "*" in k or not isinstance(v, str) or "*" in v or len(v) > 63:
            # CRD: keys non-empty without '*', values strings without '*', at most 63 characters
            reader.fail((*path, k), "label keys and values must be non-empty-key strings without '*'")
            continue
        out[k] = v
    return out


def _rule(reader: FieldReader, path: FieldPath, item: Any, *, origin: str) -> JwtRule:
    obj = reader.mapping(item, path, _RULE_FIELDS)
    issuer = reader.string(obj, "issuer", path)
    if "issuer" in obj and obj["issuer"] == "":
        reader.fail((*path, "issuer"), "must not be empty when set")
    jwks_uri = reader.string(obj, "jwksUri", path)
    jwks = reader.string(obj, "jwks", path)
    if not issuer and not jwks_uri:
        reader.fail(path, "issuer or jwksUri must be set")
    if jwks_uri and jwks:
        reader.fail((*path, "jwks"), "only one of jwks or jwksUri may be set")
    if jwks_uri:
        reader.http_url(jwks_uri, (*path, "jwksUri"))
    if jwks:
        try:
            parse_jwks(jwks, source=f"{origin}.jwks")
        except JwksError as exc:
            reader.fail((*path, "jwks"), str(exc))
    headers: list[JwtHeader] = []
    for hpath, h in reader.objects(obj, "fromHeaders", path):
        hobj = reader.mapping(h, hpath, ("name", "prefix"))
        name = reader.string(hobj, "name", hpath, required=True)
        prefix = reader.string(hobj, "prefix", hpath)
        if name:
            headers.append(JwtHeader(name.lower(), prefix))
    claim_headers: list[ClaimToHeader] = []
    seen_headers: set[str] = set()
    for cpath, c in reader.objects(obj, "outputClaimToHeaders", path):
        cobj = reader.mapping(c, cpath, ("header", "claim"))
        header = reader.string(cobj, "header", cpath, required=True)
        claim = reader.string(cobj, "claim", cpath, required=True)
        if header and not _STRICT_HEADER_RE.match(header):
            reader.fail((*cpath, "header"), f"invalid header name {header!r} (allowed: A-Z a-z 0-9 - _)")
            continue
        if header.lower() in seen_headers:
            reader.fail((*cpath, "header"), f"duplicate header {header!r}")
            continue
        if header and claim:
            seen_headers.add(header.lower())
            claim_headers.append(ClaimToHeader(header.lower(), claim))
    payload_header = reader.string(obj, "outputPayloadToHeader", path)
    if payload_header and not _STRICT_HEADER_RE.match(payload_header):
        reader.fail((*path, "outputPayloadToHeader"), f"invalid header name {payload_header!r}")
        payload_header = ""
    return JwtRule(
        issuer=issuer,
        audiences=reader.string_list(obj, "audiences", path),
        jwks_uri=jwks_uri,
        jwks=jwks,
        from_headers=tuple(headers),
        from_params=reader.string_list(obj, "fromParams", path),
        from_cookies=reader.string_list(obj, "fromCookies", path),
        output_payload_to_header=payload_header.lower(),
        forward_original_token=reader.boolean(obj, "forwardOriginalToken", path),
        output_claim_to_headers=tuple(claim_headers),
        timeout=reader.duration(obj, "timeout", path, DEFAULT_JWKS_TIMEOUT, positive=True),
        space_delimited_claims=reader.string_list(
            obj, "spaceDelimitedClaims", path, max_items=MAX_SPACE_DELIMITED_CLAIMS
        ),
        origin=origin,
    )

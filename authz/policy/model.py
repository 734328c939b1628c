"""Istio ``AuthorizationPolicy`` (security.istio.io/v1 and v1beta1) as frozen values, with validation.

Parsing applies the checks of the CRD schema and of istiod's validating webhook
(istio ``pkg/config/validation/validation.go`` ``ValidateAuthorizationPolicy`` and
``pkg/config/security/security.go``) so that what Istio would refuse we refuse at load time, each
error naming ``file:line:field``. Lint warnings (legal but probably wrong) are returned separately.

Deliberate divergence: an unknown ``when`` key is rejected here. istiod's translator would instead skip
the rule for every action (istio ``pilot/pkg/security/authz/model/model.go`` ``unknown attribute``),
which for a DENY policy fails open.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from authz.errors import ConfigError, ConfigErrors
from authz.resources import FieldPath, Resource, format_path

__all__ = [
    "API_VERSIONS",
    "HTTP_ONLY_ATTRIBUTES",
    "KIND",
    "Action",
    "AuthorizationPolicy",
    "FieldMatch",
    "PolicyWarning",
    "Rule",
    "TargetRef",
    "load_authorization_policies",
    "parse_authorization_policy",
    "parse_claim_path",
]

KIND = "AuthorizationPolicy"
# Both versions come from the same proto (istio api security/v1beta1/authorization_policy.proto,
# "+cue-gen:AuthorizationPolicy:versions:v1,v1beta1"): identical semantics.
API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
DRY_RUN_ANNOTATION = "istio.io/dry-run"

# CRD limits (istio manifests/charts/base/files/crd-all.gen.yaml).
MAX_RULES = 512
MAX_FROM = 512
MAX_TARGET_REFS = 16
MAX_SERVICE_ACCOUNTS = 16
MAX_SERVICE_ACCOUNT_LEN = 320
MAX_LABEL_VALUE_LEN = 63


class Action(enum.Enum):
    """``spec.action`` (istio api ``AuthorizationPolicy.Action``); ALLOW is the default."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


# Attributes Istio's generators refuse on a TCP filter chain ("%q is HTTP only",
# istio pilot/pkg/security/authz/model/generator.go).
HTTP_ONLY_ATTRIBUTES = frozenset(
    {
        "request.host",
        "request.method",
        "request.path",
        "request.headers",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims",
    }
)

# Source fields -> attribute (istio api message Source; model.go New()).
SOURCE_FIELDS: Mapping[str, str] = {
    "principals": "source.principal",
    "requestPrincipals": "request.auth.principal",
    "namespaces": "source.namespace",
    "serviceAccounts": "source.serviceAccount",
    "trustDomains": "source.trustDomain",
    "ipBlocks": "source.ip",
    "remoteIpBlocks": "remote.ip",
}
# Operation fields -> attribute (istio api message Operation).
OPERATION_FIELDS: Mapping[str, str] = {
    "hosts": "request.host",
    "ports": "destination.port",
    "methods": "request.method",
    "paths": "request.path",
}

# `when` keys with an exact name (istio model.go New(); security.go ValidateAttribute).
EXACT_WHEN_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "source.trustDomain",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)
HEADER_KEY_PREFIX = "request.headers"
CLAIMS_KEY_PREFIX = "request.auth.claims"
ENVOY_FILTER_KEY_PREFIX = "experimental.envoy.filters."
# Rejected legacy keys (istio security.go ValidateAttribute).
LEGACY_WHEN_KEYS: Mapping[str, str] = {
    "destination.labels": "replaced by the workload selector",
    "destination.namespace": "replaced by metadata.namespace",
    "destination.name": "only supported in v1alpha1",
    "destination.user": "only supported in v1alpha1",
}
# CUSTOM rules may not trigger on identity (istio validation.go ValidateAuthorizationPolicy).
CUSTOM_FORBIDDEN_SOURCE_FIELDS = frozenset(
    {"principals", "namespaces", "serviceAccounts", "trustDomains", "requestPrincipals"}
)
CUSTOM_FORBIDDEN_WHEN_KEYS = frozenset(
    {"source.namespace", "source.serviceAccount", "source.trustDomain", "source.principal"}
)

# Path template literal segments must be RFC 3986 pchars (istio security.go IsValidLiteral).
_VALID_LITERAL = re.compile(r"^[a-zA-Z0-9\-._~%!$&'()+,;:@=]+$")
MATCH_ONE_TEMPLATE = "{*}"
MATCH_ANY_TEMPLATE = "{**}"

# Allowed targetRef kinds, by (group, kind) (istio validation.go allowedTargetRefs).
ALLOWED_TARGET_REFS = frozenset(
    {
        ("gateway.networking.k8s.io", "Gateway"),
        ("gateway.networking.k8s.io", "GatewayClass"),
        ("", "Service"),
        ("core", "Service"),
        ("networking.istio.io", "ServiceEntry"),
    }
)


def _not_name(name: str) -> str:
    return "not" + name[0].upper() + name[1:]


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """One field of a source/operation, or one ``when`` condition: ``values`` OR-ed, ``not_values``
    OR-ed then negated, both AND-ed (istio model.go ``rule.principal``/``rule.permission``).

    ``field`` is the YAML name (``principals``) or the condition key; ``attribute`` is the canonical
    attribute (``source.principal``); ``key`` is the header name, claim path or (filter, key).
    """

    field: str
    attribute: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    key: tuple[str, ...] = ()

    @property
    def http_only(self) -> bool:
        return self.attribute in HTTP_ONLY_ATTRIBUTES

    @property
    def not_field(self) -> str:
        """The YAML name of the negative list (``notPrincipals``; for a condition, ``notValues``)."""
        if "." in self.field or "[" in self.field:
            return "notValues"
        return _not_name(self.field)


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule: ``OR(from) AND OR(to) AND AND(when)`` (istio api ``message Rule``).

    ``sources``/``operations`` are ``None`` when ``from``/``to`` is absent (any source/operation).
    """

    sources: tuple[tuple[FieldMatch, ...], ...] | None = None
    operations: tuple[tuple[FieldMatch, ...], ...] | None = None
    conditions: tuple[FieldMatch, ...] = ()
    line: int = 0

    def all_matches(self) -> tuple[FieldMatch, ...]:
        out: list[FieldMatch] = []
        for group in (self.sources or ()) + (self.operations or ()):
            out.extend(group)
        out.extend(self.conditions)
        return tuple(out)

    @property
    def http_only_fields(self) -> tuple[FieldMatch, ...]:
        return tuple(m for m in self.all_matches() if m.http_only)


@dataclass(frozen=True, slots=True)
class TargetRef:
    group: str
    kind: str
    name: str


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] | None = None
    """``None`` when ``rules`` is absent: the policy never matches (istio builder.go)."""
    selector: Mapping[str, str] | None = None
    target_refs: tuple[TargetRef, ...] = ()
    provider: str = ""
    dry_run: bool = False
    api_version: str = "security.istio.io/v1"
    file: str = ""
    line: int = 0

    @property
    def policy_name(self) -> str:
        """Envoy RBAC policy name prefix (istio builder.go ``policyName``)."""
        return f"ns[{self.namespace}]-policy[{self.name}]"

    def rule_id(self, index: int) -> str:
        return f"{self.policy_name}-rule[{index}]"


@dataclass(frozen=True, slots=True)
class PolicyWarning:
    """A lint finding: legal configuration that probably does not do what its author meant."""

    message: str
    file: str = ""
    line: int = 0
    field: str = ""
    code: str = "lint"

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line:
            where += f":{self.line}"
        what = f"{self.field}: " if self.field else ""
        return f"{where}: warning: {what}{self.message}"


def parse_claim_path(suffix: str) -> list[str]:
    """Claim names of ``[a][b]`` (istio model/util.go ``extractNameInNestedBrackets``).

    ``[good][abc]`` -> ``["good", "abc"]``; ``[[good]`` -> ``["[good"]``; ``[good]]`` -> ``["good]"]``;
    ``x[bad]`` -> ValueError. Dots are not separators.
    """

    def find_end(begin: int) -> int:
        if begin >= len(suffix) or suffix[begin] != "[":
            return -1
        for i in range(begin + 1, len(suffix)):
            if suffix[i] == "[":
                return -1
            if suffix[i] == "]":
                return i
        return -1

    claims: list[str] = []
    begin = 0
    while begin < len(suffix):
        end = find_end(begin)
        if end == -1:
            if not (suffix.startswith("[") and suffix.endswith("]")):
                raise ValueError(f"must be in the format of [name]: {suffix}")
            return [suffix[1:-1]]
        claims.append(suffix[begin + 1 : end])
        begin = end + 1
    return claims


def _valid_map_key(key: str) -> bool:
    """istio security.go ``validateMapKey``: ``a[b]`` with ``[`` after the first character."""
    open_ = key.find("[")
    return open_ > 0 and key.endswith("]") and open_ < len(key) - 2


def _parse_bool(text: str) -> bool | None:
    """Go ``strconv.ParseBool`` (istio validation.go checkDryRunAnnotation)."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _is_ip_or_cidr(value: str) -> bool:
    """istio security.go ``ValidateIPs`` (``netip.ParseAddr`` / ``netip.ParsePrefix``)."""
    try:
        if "/" in value:
            addr, _, bits = value.partition("/")
            if not bits.isdigit() or (len(bits) > 1 and bits[0] == "0") or "%" in addr:
                return False
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_port(value: str) -> bool:
    """istio security.go ``ValidatePorts``: a decimal in 0..65535."""
    return value.isascii() and value.isdigit() and int(value) <= 65535


def path_template_error(path: str) -> str | None:
    """istio security.go ``CheckValidPathTemplate``: None if ``path`` is acceptable."""
    contains_template = MATCH_ONE_TEMPLATE in path or MATCH_ANY_TEMPLATE in path
    found_any = False
    for glob in path.strip("/").split("/"):
        if glob == MATCH_ONE_TEMPLATE and not found_any:
            continue
        if glob == MATCH_ANY_TEMPLATE and not found_any:
            found_any = True
            continue
        if glob in (MATCH_ONE_TEMPLATE, MATCH_ANY_TEMPLATE) and found_any:
            return "{**} is not the last operator"
        if "{" in glob or "}" in glob:
            return "contains '{' or '}' beyond a supported path template"
        if contains_template and not _VALID_LITERAL.match(glob):
            return f"contains segment {glob!r} with an invalid string literal"
    return None


def _has_middle_star(value: str) -> bool:
    return "*" in value[1:-1] if len(value) > 2 else False


class _PolicyParser:
    """Parses one resource, collecting every error and warning with its file, line and field."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.errors: list[ConfigError] = []
        self.warnings: list[PolicyWarning] = []
        self.action = Action.ALLOW

    # -- reporting ---------------------------------------------------------------------------
    def error(self, path: FieldPath, message: str, reason: str = "invalid_policy") -> None:
        self.errors.append(self.resource.error(path, message, reason=reason))

    def warn(self, path: FieldPath, message: str, code: str) -> None:
        r = self.resource
        self.warnings.append(
            PolicyWarning(
                f"{r.kind} {r.namespace}/{r.name}: {message}",
                file=r.file,
                line=r.line_of(path),
                field=format_path(path),
                code=code,
            )
        )

    # -- generic shapes ------------------------------------------------------------------------
    def mapping(self, value: Any, path: FieldPath, allowed: Sequence[str]) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(path, "must be a mapping")
            return None
        for key in value:
            if key not in allowed:
                self.error((*path, key), f"unknown field {key!r} (allowed: {', '.join(allowed)})")
        return value

    def string_list(self, value: Any, path: FieldPath) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error(path, "must be a list of strings")
            return ()
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.error((*path, i), f"must be a string, got {type(item).__name__} (quote it)")
                continue
            if item == "":
                # istio security.go CheckEmptyValues
                self.error((*path, i), "empty value not allowed")
                continue
            out.append(item)
        return tuple(out)

    # -- the resource -------------------------------------------------------------------------
    def parse(self) -> AuthorizationPolicy | None:
        r = self.resource
        if r.api_version not in API_VERSIONS:
            self.error(
                ("apiVersion",),
                f"unsupported apiVersion {r.api_version!r} (use {' or '.join(sorted(API_VERSIONS))})",
            )
        spec_raw = r.spec if r.spec is not None else {}
        spec = self.mapping(
            spec_raw, ("spec",), ("selector", "targetRef", "targetRefs", "rules", "action", "provider")
        )
        if spec is None:
            return None
        action = self.parse_action(spec.get("action"))
        self.action = action
        provider = self.parse_provider(spec.get("provider"), action)
        selector = self.parse_selector(spec.get("selector"))
        target_refs = self.parse_target_refs(spec)
        if "selector" in spec and ("targetRef" in spec or "targetRefs" in spec):
            self.error(("spec", "selector"), "only one of selector, targetRef or targetRefs can be set")
        if "targetRef" in spec and "targetRefs" in spec:
            self.error(("spec", "targetRef"), "only one of targetRef or targetRefs can be set")
        dry_run = self.parse_dry_run(action)
        rules = self.parse_rules(spec, action)
        return AuthorizationPolicy(
            name=r.name,
            namespace=r.namespace,
            action=action,
            rules=rules,
            selector=selector,
            target_refs=target_refs,
            provider=provider,
            dry_run=dry_run,
            api_version=r.api_version,
            file=r.file,
            line=r.line,
        )

    def parse_action(self, raw: Any) -> Action:
        if raw is None:
            return Action.ALLOW
        if not isinstance(raw, str) or raw not in Action.__members__:
            self.error(("spec", "action"), f"unknown action {raw!r} (ALLOW, DENY, AUDIT, CUSTOM)")
            return Action.ALLOW
        return Action[raw]

    def parse_provider(self, raw: Any, action: Action) -> str:
        path: FieldPath = ("spec", "provider")
        prov = self.mapping(raw, path, ("name",))
        name = prov.get("name") if prov else None
        if name is not None and not isinstance(name, str):
            self.error((*path, "name"), "must be a string")
            name = None
        if action is Action.CUSTOM:
            if not name:
                self.error(path, "CUSTOM action without provider.name")
            return name or ""
        if raw is not None:
            self.error(path, "provider must not be set for ALLOW, DENY and AUDIT actions")
        return ""

    def parse_selector(self, raw: Any) -> Mapping[str, str] | None:
        path: FieldPath = ("spec", "selector")
        sel = self.mapping(raw, path, ("matchLabels",))
        if sel is None:
            return None
        labels = sel.get("matchLabels")
        if labels is None:
            self.warn(path, "workload selector specified without labels: selects every workload", "selector")
            return {}
        if not isinstance(labels, dict):
            self.error((*path, "matchLabels"), "must map strings to strings")
            return {}
        out: dict[str, str] = {}
        for key, value in labels.items():
            lpath: FieldPath = (*path, "matchLabels", key)
            if not key:
                self.error(lpath, "label key must not be empty")
            elif "*" in key:
                self.error(lpath, "wildcard is not supported in selector label keys")
            if not isinstance(value, str):
                self.error(lpath, "label value must be a string (quote it)")
                continue
            if "*" in value:
                self.error(lpath, "wildcard is not supported in selector label values")
            if len(value) > MAX_LABEL_VALUE_LEN:
                self.error(lpath, f"label value longer than {MAX_LABEL_VALUE_LEN} characters")
            out[key] = value
        if not out:
            self.warn(path, "workload selector specified without labels: selects every workload", "selector")
        return out

    def parse_target_refs(self, spec: Mapping[str, Any]) -> tuple[TargetRef, ...]:
        refs: list[tuple[FieldPath, Any]] = []
        if "targetRef" in spec:
            refs.append((("spec", "targetRef"), spec["targetRef"]))
        if "targetRefs" in spec:
            raw = spec["targetRefs"]
            if not isinstance(raw, list):
                self.error(("spec", "targetRefs"), "must be a list")
            else:
                if len(raw) > MAX_TARGET_REFS:
                    self.error(("spec", "targetRefs"), f"at most {MAX_TARGET_REFS} targetRefs")
                refs.extend(((("spec", "targetRefs", i), item) for i, item in enumerate(raw)))
        out: list[TargetRef] = []
        for path, raw in refs:
            ref = self.mapping(raw, path, ("group", "kind", "name", "namespace"))
            if ref is None:
                self.error(path, "must not be empty")
                continue
            group, kind, name = ref.get("group", ""), ref.get("kind", ""), ref.get("name", "")
            if not all(isinstance(x, str) for x in (group, kind, name)):
                self.error(path, "group, kind and name must be strings")
                continue
            if ref.get("namespace"):
                self.error((*path, "namespace"), "cross namespace referencing is not currently supported")
            if not name:
                self.error((*path, "name"), "name is required")
            if (group, kind) not in ALLOWED_TARGET_REFS:
                self.error(path, f"targetRef kind {group}/{kind} is not supported")
            out.append(TargetRef(group=group, kind=kind, name=name))
        return tuple(out)

    def parse_dry_run(self, action: Action) -> bool:
        """istio validation.go ``checkDryRunAnnotation``."""
        raw = self.resource.annotations.get(DRY_RUN_ANNOTATION)
        if raw is None:
            return False
        path: FieldPath = ("metadata", "annotations", DRY_RUN_ANNOTATION)
        if action not in (Action.ALLOW, Action.DENY):
            self.error(path, f"{DRY_RUN_ANNOTATION} is currently only supported for ALLOW and DENY")
            return False
        value = _parse_bool(raw)
        if value is None:
            self.error(path, f"invalid {DRY_RUN_ANNOTATION} value {raw!r} (want true or false)")
            return False
        return value

    def parse_rules(self, spec: Mapping[str, Any], action: Action) -> tuple[Rule, ...] | None:
        path: FieldPath = ("spec", "rules")
        raw = spec.get("rules")
        if raw is None:
            # istio validation.go: DENY/CUSTOM without rules are meaningless.
            if action is Action.DENY:
                self.error(
                    path,
                    "DENY action without `rules` is meaningless (it never matches); add an empty rule `{}`",
                )
            elif action is Action.CUSTOM:
                self.error(path, "CUSTOM action without `rules` is meaningless: add an empty rule `{}`")
            return None
        if not isinstance(raw, list):
            self.error(path, "must be a list")
            return None
        if len(raw) > MAX_RULES:
            self.error(path, f"at most {MAX_RULES} rules")
        rules: list[Rule] = []
        for i, item in enumerate(raw):
            rule = self.parse_rule(item, (*path, i))
            if rule is not None:
                rules.append(rule)
        return tuple(rules)

    def parse_rule(self, raw: Any, path: FieldPath) -> Rule | None:
        if raw is None:
            self.error(path, "`rule` must not be nil")
            return None
        rule = self.mapping(raw, path, ("from", "to", "when"))
        if rule is None:
            return None
        sources = self.parse_entries(rule, path, "from", "source", SOURCE_FIELDS)
        operations = self.parse_entries(rule, path, "to", "operation", OPERATION_FIELDS)
        conditions = self.parse_conditions(rule.get("when"), (*path, "when"))
        parsed = Rule(
            sources=sources, operations=operations, conditions=conditions, line=self.resource.line_of(path)
        )
        self.lint_rule(parsed, path)
        return parsed

    def parse_entries(
        self,
        rule: Mapping[str, Any],
        path: FieldPath,
        list_name: str,
        item_name: str,
        fields: Mapping[str, str],
    ) -> tuple[tuple[FieldMatch, ...], ...] | None:
        if list_name not in rule:
            return None
        lpath: FieldPath = (*path, list_name)
        raw = rule[list_name]
        if raw is None or (isinstance(raw, list) and not raw):
            self.error(lpath, f"`{list_name}` must not be empty")
            return ()
        if not isinstance(raw, list):
            self.error(lpath, "must be a list")
            return ()
        if list_name == "from" and len(raw) > MAX_FROM:
            self.error(lpath, f"at most {MAX_FROM} entries")
        out: list[tuple[FieldMatch, ...]] = []
        for i, entry_raw in enumerate(raw):
            epath: FieldPath = (*lpath, i)
            if entry_raw is None:
                self.error(epath, f"`{list_name}` element must not be nil")
                continue
            entry = self.mapping(entry_raw, epath, (item_name,))
            if entry is None:
                continue
            ipath: FieldPath = (*epath, item_name)
            allowed = [n for name in fields for n in (name, _not_name(name))]
            body = self.mapping(entry.get(item_name), ipath, allowed)
            if body is None:
                self.error(ipath, f"`{list_name}.{item_name}` must not be nil")
                continue
            matches: list[FieldMatch] = []
            for name, attribute in fields.items():
                values = self.string_list(body.get(name), (*ipath, name))
                not_values = self.string_list(body.get(_not_name(name)), (*ipath, _not_name(name)))
                if values or not_values:
                    fm = FieldMatch(field=name, attribute=attribute, values=values, not_values=not_values)
                    self.check_field(fm, ipath)
                    matches.append(fm)
            if not matches:
                self.error(ipath, f"`{list_name}.{item_name}` must not be empty")
                continue
            if item_name == "source":
                self.check_source(body, ipath)
            out.append(tuple(matches))
        return tuple(out)

    def check_source(self, body: Mapping[str, Any], path: FieldPath) -> None:
        sa = bool(body.get("serviceAccounts") or body.get("notServiceAccounts"))
        if sa and any(body.get(k) for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")):
            self.error(
                (*path, "serviceAccounts"),
                "serviceAccounts cannot be set with principals or namespaces (or their negations)",
            )

    def parse_conditions(self, raw: Any, path: FieldPath) -> tuple[FieldMatch, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.error(path, "must be a list")
            return ()
        out: list[FieldMatch] = []
        for i, item in enumerate(raw):
            cpath: FieldPath = (*path, i)
            if item is None:
                self.error(cpath, "`when` element must not be nil")
                continue
            cond = self.mapping(item, cpath, ("key", "values", "notValues"))
            if cond is None:
                continue
            key = cond.get("key")
            if not isinstance(key, str) or not key:
                self.error((*cpath, "key"), "`key` must not be empty")
                continue
            values = self.string_list(cond.get("values"), (*cpath, "values"))
            not_values = self.string_list(cond.get("notValues"), (*cpath, "notValues"))
            if not cond.get("values") and not cond.get("notValues"):
                self.error(cpath, "at least one of `values` or `notValues` must be set")
                continue
            fm = self.condition(key, values, not_values, cpath)
            if fm is not None:
                self.check_field(fm, cpath)
                out.append(fm)
        return tuple(out)

    def condition(
        self, key: str, values: tuple[str, ...], not_values: tuple[str, ...], path: FieldPath
    ) -> FieldMatch | None:
        """Map a ``when`` key to its attribute (istio security.go ``ValidateAttribute``)."""
        kpath: FieldPath = (*path, "key")
        if key in EXACT_WHEN_KEYS:
            return FieldMatch(field=key, attribute=key, values=values, not_values=not_values)
        if key.startswith(HEADER_KEY_PREFIX):
            if not _valid_map_key(key) or key[len(HEADER_KEY_PREFIX)] != "[":
                self.error(kpath, f"invalid key {key!r}: want request.headers[<name>]")
                return None
            name = key[len(HEADER_KEY_PREFIX) + 1 : -1].lower()
            return FieldMatch(key, "request.headers", values, not_values, key=(name,))
        if key.startswith(CLAIMS_KEY_PREFIX):
            suffix = key[len(CLAIMS_KEY_PREFIX) :]
            try:
                if not _valid_map_key(key):
                    raise ValueError(key)
                claims = parse_claim_path(suffix)
            except ValueError:
                self.error(kpath, f"invalid key {key!r}: want request.auth.claims[<name>] or [<a>][<b>]")
                return None
            return FieldMatch(key, "request.auth.claims", values, not_values, key=tuple(claims))
        if key.startswith(ENVOY_FILTER_KEY_PREFIX):
            if not _valid_map_key(key):
                self.error(kpath, f"invalid key {key!r}: want experimental.envoy.filters.<filter>[<key>]")
                return None
            filter_name, _, meta_key = key.removeprefix("experimental.")[:-1].partition("[")
            return FieldMatch(
                key, "experimental.envoy.filters", values, not_values, key=(filter_name, meta_key)
            )
        for legacy, why in LEGACY_WHEN_KEYS.items():
            if key == legacy or key.startswith(legacy + "["):
                self.error(kpath, f"attribute {key} is no longer supported: {why}")
                return None
        self.error(
            kpath,
            f"unknown attribute {key!r} (rejected at load time: Istio would silently skip the whole rule)",
            reason="unknown_attribute",
        )
        return None

    # -- per-field checks ------------------------------------------------------------------------
    def check_field(self, fm: FieldMatch, path: FieldPath) -> None:
        is_condition = fm.field == fm.attribute or "[" in fm.field
        for values, name in ((fm.values, "values" if is_condition else fm.field), (fm.not_values, None)):
            if not values:
                continue
            vname = name or fm.not_field
            vpath: FieldPath = (*path, vname)
            self.check_values(fm, values, vpath)
        self.check_custom(fm, path)

    def check_values(self, fm: FieldMatch, values: tuple[str, ...], vpath: FieldPath) -> None:
        attribute = fm.attribute
        if attribute in ("source.ip", "remote.ip", "destination.ip"):
            for v in values:
                if not _is_ip_or_cidr(v):
                    self.error(vpath, f"invalid IP address or CIDR range {v!r}")
        elif attribute == "destination.port":
            for v in values:
                if not _is_port(v):
                    self.error(vpath, f"invalid port {v!r} (want a number in 0-65535)")
        elif attribute == "source.serviceAccount":
            if len(values) > MAX_SERVICE_ACCOUNTS:
                self.error(vpath, f"at most {MAX_SERVICE_ACCOUNTS} service accounts")
            for v in values:
                if len(v) > MAX_SERVICE_ACCOUNT_LEN:
                    self.error(vpath, f"service account longer than {MAX_SERVICE_ACCOUNT_LEN} characters")
                elif "*" in v:
                    self.error(vpath, f"wildcards are not supported in service accounts: {v!r}")
                elif v.count("/") > 1 or v.startswith("/") or v.endswith("/"):
                    self.error(vpath, f"service account must be <name> or <namespace>/<name>: {v!r}")
        elif attribute == "source.trustDomain":
            for v in values:
                if "/" in v:
                    self.error(vpath, f"trust domain must not contain '/': {v!r}")
                elif _has_middle_star(v) or v.count("*") > 1:
                    self.error(vpath, f"wildcard is only supported at the start or end: {v!r}")
        elif attribute == "request.path":
            for v in values:
                problem = path_template_error(v)
                if problem:
                    self.error(vpath, f"invalid or unsupported path {v!r}: {problem}")
        self.lint_values(fm, values, vpath)

    def check_custom(self, fm: FieldMatch, path: FieldPath) -> None:
        """CUSTOM rules cannot trigger on identity (istio validation.go)."""
        if self.action is not Action.CUSTOM:
            return
        if fm.field in CUSTOM_FORBIDDEN_SOURCE_FIELDS:
            self.error(
                (*path, fm.field), f"{fm.field} and {fm.not_field} are not supported with CUSTOM action"
            )
        elif fm.attribute in CUSTOM_FORBIDDEN_WHEN_KEYS or fm.field.startswith("request.auth."):
            self.error(path, f"when key {fm.field} is not supported with CUSTOM action")

    # -- lint -------------------------------------------------------------------------------------
    def lint_values(self, fm: FieldMatch, values: tuple[str, ...], vpath: FieldPath) -> None:
        attribute = fm.attribute
        for v in values:
            if (
                _has_middle_star(v)
                and attribute not in ("source.namespace", "source.trustDomain")
                and not (attribute == "request.path" and (MATCH_ONE_TEMPLATE in v or MATCH_ANY_TEMPLATE in v))
            ):
                self.warn(
                    vpath,
                    f"{v!r}: a '*' in the middle is a literal character, not a wildcard "
                    "(only a single leading or trailing '*' is a wildcard)",
                    "middle_wildcard",
                )
            if attribute == "source.principal" and v.startswith("spiffe://"):
                self.warn(
                    vpath,
                    f"{v!r}: principals are written without 'spiffe://'; this value never matches",
                    "spiffe_prefix",
                )
            if attribute == "request.host" and v != "*" and v.startswith("*") and v.endswith(":*"):
                self.warn(
                    vpath,
                    f"{v!r} is a suffix match on {v[1:]!r} with a literal '*': it never matches",
                    "host_port_wildcard",
                )
            if attribute == "request.auth.principal" and v != "*":
                iss, sep, sub = v.rpartition("/")
                if sep and iss.endswith("/"):
                    self.warn(
                        vpath,
                        f"{v!r} is split on the last '/': issuer {iss!r} ends in '/' (ambiguous); "
                        "prefer when: request.auth.claims[iss] and request.auth.claims[sub]",
                        "request_principal_ambiguous",
                    )
                elif sep and "://" in iss and ":" in iss.split("://", 1)[1].split("/", 1)[-1]:
                    self.warn(
                        vpath,
                        f"{v!r} is split on the last '/' into issuer {iss!r} and subject {sub!r}; a subject "
                        "containing '/' cannot be matched this way; use request.auth.claims[iss]/[sub]",
                        "request_principal_ambiguous",
                    )
            if attribute == "request.auth.claims" and (
                v in ("true", "false") or re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", v)
            ):
                self.warn(
                    vpath,
                    f"{v!r} looks like a boolean or number: claims of a non-string type never match "
                    "(only string or list-of-string claims are compared)",
                    "non_string_claim",
                )
        if attribute == "request.host" and vpath[-1] == "hosts":
            present = set(values)
            for v in values:
                if v != "*" and ":" not in v and not v.endswith("*") and f"{v}:*" not in present:
                    self.warn(
                        vpath,
                        f"{v!r} does not match a Host header with a port (e.g. {v}:8080); add {v + ':*'!r}",
                        "host_without_port",
                    )

    def lint_rule(self, rule: Rule, path: FieldPath) -> None:
        http_only = rule.http_only_fields
        if not http_only:
            return
        has_port = any(m.attribute == "destination.port" for m in rule.all_matches())
        names = ", ".join(sorted({m.field for m in http_only}))
        if self.action in (Action.DENY, Action.AUDIT, Action.CUSTOM) and not has_port:
            self.warn(
                path,
                f"on TCP traffic the HTTP-only fields ({names}) are ignored, so this {self.action.value} "
                "rule applies to ALL TCP traffic to the workloads in scope; add `ports` to limit it",
                "tcp_widened",
            )
        elif self.action is Action.ALLOW and has_port:
            self.warn(
                path,
                f"this ALLOW rule uses HTTP-only fields ({names}); on a TCP port it is dropped "
                "entirely, so TCP traffic to those ports is denied",
                "tcp_dropped",
            )


def parse_authorization_policy(resource: Resource) -> tuple[AuthorizationPolicy | None, list[PolicyWarning]]:
    """Parse one resource of kind AuthorizationPolicy. Raises :class:`ConfigErrors` listing every problem."""
    parser = _PolicyParser(resource)
    policy = parser.parse()
    if parser.errors:
        raise ConfigErrors(parser.errors)
    return policy, parser.warnings


def load_authorization_policies(
    resources: Sequence[Resource],
) -> tuple[list[AuthorizationPolicy], list[PolicyWarning]]:
    """Parse every AuthorizationPolicy in ``resources`` (other kinds are ignored).

    Collects all errors of the load and raises :class:`authz.errors.ConfigErrors` if there are any.
    """
    errors: list[ConfigError] = []
    warnings: list[PolicyWarning] = []
    policies: list[AuthorizationPolicy] = []
    seen: dict[tuple[str, str], Resource] = {}
    for resource in resources:
        if resource.kind != KIND:
            continue
        key = (resource.namespace, resource.name)
        if key in seen:
            first = seen[key]
            errors.append(
                resource.error(
                    ("metadata", "name"),
                    f"duplicate AuthorizationPolicy {key[0]}/{key[1]} "
                    f"(first defined at {first.file}:{first.line})",
                    reason="duplicate_policy",
                )
            )
            continue
        seen[key] = resource
        parser = _PolicyParser(resource)
        policy = parser.parse()
        errors.extend(parser.errors)
        warnings.extend(parser.warnings)
        if policy is not None and not parser.errors:
            policies.append(policy)
    if errors:
        raise ConfigErrors(errors)
    return policies, warnings

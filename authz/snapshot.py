"""A policy snapshot: every resource of a policy folder, validated and compiled, ready to evaluate.

Loading is all-or-nothing: a folder with any error yields :class:`~authz.errors.ConfigErrors` and no
snapshot, so a bad reload can never replace the set in force.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authz.authn import (
    AuthnSettings,
    JwtRule,
    RequestAuthentication,
    jwt_rules_for,
    load_issuer_settings,
    load_request_authentications,
    resolve_secrets,
)
from authz.authn.jwk import JwksError, parse_jwks
from authz.config import MeshConfig
from authz.errors import ConfigError, ConfigErrors
from authz.policy import CompiledPolicies, PolicyWarning, compile_policies, load_authorization_policies
from authz.request import Workload
from authz.resources import Resource, format_path, load_resources

__all__ = ["Snapshot", "build_snapshot", "inline_jwks_warnings", "load_snapshot"]


@dataclass(eq=False)
class Snapshot:
    generation: int
    loaded_at: float
    sources: tuple[str, ...]
    policies: CompiledPolicies
    request_authentications: tuple[RequestAuthentication, ...]
    authn_settings: AuthnSettings
    resources: tuple[Resource, ...]
    warnings: tuple[PolicyWarning, ...]
    root_namespace: str
    _rules_by_workload: dict[tuple[str, frozenset[tuple[str, str]]], tuple[JwtRule, ...]] = field(
        default_factory=dict
    )

    def jwt_rules_for(self, workload: Workload) -> tuple[JwtRule, ...]:
        """The merged jwtRules of every RequestAuthentication selecting ``workload`` (memoized)."""
        key = (workload.namespace, frozenset(workload.labels.items()))
        rules = self._rules_by_workload.get(key)
        if rules is None:
            if len(self._rules_by_workload) > 10_000:  # bounded: workloads are few, label sets finite
                self._rules_by_workload.clear()
            rules = tuple(
                jwt_rules_for(self.request_authentications, workload, root_namespace=self.root_namespace)
            )
            self._rules_by_workload[key] = rules
        return rules

    def all_jwt_rules(self) -> tuple[JwtRule, ...]:
        """Every jwtRule of every RequestAuthentication (to start key fetching ahead of traffic)."""
        return tuple(rule for ra in self.request_authentications for rule in ra.jwt_rules)

    def headers_read(self) -> frozenset[str]:
        """The (lower-case) names of every request header a check under this policy set may read: those
        AuthorizationPolicy rules match (``request.headers[...]``, in any clause) and the jwtRules' token
        locations (their headers; ``cookie`` when a rule reads cookies). Query parameters are part of the
        path."""
        names: set[str] = set()
        for policy in self.policies.policies:
            for rule in policy.rules or ():
                clauses = (*(rule.sources or ()), *(rule.operations or ()), rule.conditions)
                for clause in clauses:
                    for match in clause:
                        if match.attribute == "request.headers" and match.key:
                            names.add(match.key[0].lower())
        for jwt_rule in self.all_jwt_rules():
            names.update(header.name.lower() for header in jwt_rule.headers)
            if jwt_rule.from_cookies:
                names.add("cookie")
        return frozenset(names)

    def describe(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for r in self.resources:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        return {
            "generation": self.generation,
            "loaded_at": self.loaded_at,
            "sources": list(self.sources),
            "resources": [
                {"kind": r.kind, "namespace": r.namespace, "name": r.name, "file": r.file, "line": r.line}
                for r in self.resources
            ],
            "counts": kinds,
            "warnings": [str(w) for w in self.warnings],
        }


KNOWN_KINDS = frozenset({"AuthorizationPolicy", "RequestAuthentication", "JWTIssuerSettings"})


def build_snapshot(
    resources: Sequence[Resource],
    mesh: MeshConfig,
    *,
    generation: int,
    loaded_at: float,
    sources: Iterable[str] = (),
) -> Snapshot:
    """Validate and compile ``resources``; raises :class:`ConfigErrors` with every problem found."""
    errors: list[ConfigError] = []
    warnings: list[PolicyWarning] = []
    policies: list[Any] = []
    ras: list[RequestAuthentication] = []
    settings = AuthnSettings()
    try:
        policies, policy_warnings = load_authorization_policies(resources)
        warnings.extend(policy_warnings)
    except ConfigErrors as exc:
        errors.extend(exc.errors)
    try:
        ras = list(load_request_authentications(resources))
        warnings.extend(inline_jwks_warnings(resources))
    except ConfigErrors as exc:
        errors.extend(exc.errors)
    try:
        settings = resolve_secrets(
            load_issuer_settings(resources), environ=os.environ, read_file=lambda p: Path(p).read_bytes()
        )
    except ConfigErrors as exc:
        errors.extend(exc.errors)
    except ConfigError as exc:
        errors.append(exc)
    if errors:
        raise ConfigErrors(errors)
    compiled = compile_policies(policies, mesh)
    return Snapshot(
        generation=generation,
        loaded_at=loaded_at,
        sources=tuple(sources),
        policies=compiled,
        request_authentications=tuple(ras),
        authn_settings=settings,
        resources=tuple(r for r in resources if r.kind in KNOWN_KINDS),
        warnings=tuple(warnings),
        root_namespace=mesh.root_namespace,
    )


def load_snapshot(paths: Sequence[Path], mesh: MeshConfig, *, generation: int, loaded_at: float) -> Snapshot:
    """Read every policy file under ``paths`` and build a snapshot (all-or-nothing)."""
    resources = load_resources(paths)
    return build_snapshot(
        resources, mesh, generation=generation, loaded_at=loaded_at, sources=[str(p) for p in paths]
    )


def inline_jwks_warnings(resources: Iterable[Resource]) -> list[PolicyWarning]:
    """A RequestAuthentication whose inline ``jwks`` carries private key members (RFC 7518 section 6.3.2
    ``d``, ``p``, ``q``, ...; section 6.4.1 ``k``) works (only the public part is used) but has leaked a
    secret into a policy file: say so, naming the file, line and field."""
    found: list[PolicyWarning] = []
    for res in resources:
        if res.kind != "RequestAuthentication" or not isinstance(res.spec, dict):
            continue
        rules = res.spec.get("jwtRules")
        for i, rule in enumerate(rules if isinstance(rules, list) else ()):
            jwks = rule.get("jwks") if isinstance(rule, dict) else None
            if not isinstance(jwks, str) or not jwks:
                continue
            try:
                private = parse_jwks(jwks, source="jwks").has_private_material
            except JwksError:  # reported as an error by the loader
                continue
            if private:
                path = ("spec", "jwtRules", i, "jwks")
                found.append(
                    PolicyWarning(
                        f"RequestAuthentication {res.namespace}/{res.name}: the inline JWKS contains private "
                        "key material (d, p, q, ... or k); publish only public keys and rotate this one",
                        file=res.file,
                        line=res.line_of(path),
                        field=format_path(path),
                        code="jwks_private_key",
                    )
                )
    return found

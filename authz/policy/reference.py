"""A straightforward evaluator read directly off the model and spec §1.4-1.5, §1.9, with no index.

It exists to check :func:`authz.policy.evaluate.evaluate` (tests compare the two on random policies
and requests); it is not used on the request path.
"""

from __future__ import annotations

from collections.abc import Sequence

from authz.config import MeshConfig
from authz.decision import Reason, ShadowResult
from authz.policy.evaluate import NO_ALLOW_MATCH_POLICY_ID, PolicyResult
from authz.policy.matchers import RequestView, value_predicate
from authz.policy.model import Action, AuthorizationPolicy, FieldMatch, Rule
from authz.request import Request, RequestAuth, Workload
from authz.workload import selects

__all__ = ["reference_evaluate"]


def _value_matches(
    fm: FieldMatch, value: str, view: RequestView, policy: AuthorizationPolicy, mesh: MeshConfig
) -> bool:
    preds = value_predicate(fm, value, policy_namespace=policy.namespace, mesh=mesh)
    return any(p(view) for p in preds)


def _field_matches(fm: FieldMatch, view: RequestView, policy: AuthorizationPolicy, mesh: MeshConfig) -> bool:
    """AND(OR(values), NOT(OR(notValues))) (spec §1.5 ``field_matches``)."""
    if fm.values and not any(_value_matches(fm, v, view, policy, mesh) for v in fm.values):
        return False
    return not (fm.not_values and any(_value_matches(fm, v, view, policy, mesh) for v in fm.not_values))


def _rule_matches(
    rule: Rule, view: RequestView, policy: AuthorizationPolicy, mesh: MeshConfig, tcp: bool
) -> bool:
    def relevant(fm: FieldMatch) -> bool:
        # TCP, DENY/AUDIT/CUSTOM: HTTP-only matchers are removed (treated as matching).
        return not (tcp and fm.http_only)

    def entry_matches(entry: tuple[FieldMatch, ...]) -> bool:
        return all(_field_matches(fm, view, policy, mesh) for fm in entry if relevant(fm))

    if tcp and policy.action is Action.ALLOW and any(fm.http_only for fm in rule.all_matches()):
        return False  # TCP, ALLOW: the whole rule is dropped
    if rule.sources is not None and not any(entry_matches(e) for e in rule.sources):
        return False
    if rule.operations is not None and not any(entry_matches(e) for e in rule.operations):
        return False
    return all(_field_matches(fm, view, policy, mesh) for fm in rule.conditions if relevant(fm))


def _matching_ids(
    policies: Sequence[AuthorizationPolicy], view: RequestView, mesh: MeshConfig, tcp: bool
) -> list[str]:
    ids = []
    for policy in policies:
        for i, rule in enumerate(policy.rules or ()):
            if _rule_matches(rule, view, policy, mesh, tcp):
                ids.append(policy.rule_id(i))
    return sorted(ids)


def reference_evaluate(
    policies: Sequence[AuthorizationPolicy],
    mesh: MeshConfig,
    request: Request,
    workload: Workload,
    auth: RequestAuth | None,
    *,
    path: str,
) -> PolicyResult:
    view = RequestView(request, auth, path)
    tcp = request.http is None
    selected = [
        p
        for p in policies
        if not p.target_refs
        and selects(p.namespace, p.selector, workload, root_namespace=mesh.root_namespace)
    ]

    def of(action: Action, dry_run: bool) -> list[AuthorizationPolicy]:
        return [p for p in selected if p.action is action and p.dry_run == dry_run]

    audit_ids = _matching_ids(of(Action.AUDIT, False), view, mesh, tcp)
    audit_id = audit_ids[0] if audit_ids else ""
    shadow = None
    if of(Action.DENY, True):
        ids = _matching_ids(of(Action.DENY, True), view, mesh, tcp)
        shadow = ShadowResult(allowed=not ids, policy_id=ids[0] if ids else "")
    deny_ids = _matching_ids(of(Action.DENY, False), view, mesh, tcp)

    def result(allowed: bool, reason: str, policy_id: str) -> PolicyResult:
        return PolicyResult(
            allowed,
            reason,
            policy_id,
            audit=bool(audit_ids),
            audit_policy_id=audit_id,
            shadow=shadow,
            normalized_path=path,
        )

    if deny_ids:
        return result(False, Reason.DENIED_BY_POLICY, deny_ids[0])
    if of(Action.ALLOW, True) and (shadow is None or shadow.allowed):
        ids = _matching_ids(of(Action.ALLOW, True), view, mesh, tcp)
        shadow = ShadowResult(allowed=bool(ids), policy_id=ids[0] if ids else NO_ALLOW_MATCH_POLICY_ID)
    allow_policies = of(Action.ALLOW, False)
    if allow_policies:
        ids = _matching_ids(allow_policies, view, mesh, tcp)
        if not ids:
            return result(False, Reason.NO_ALLOW_MATCH, NO_ALLOW_MATCH_POLICY_ID)
        return result(True, Reason.ALLOWED_BY_POLICY, ids[0])
    return result(True, Reason.ALLOWED_NO_POLICY, "")

"""Evaluate compiled policies for one request: a pure function of its arguments.

Order (spec §1.4 and §7; istio ``listener_builder.go`` filter order): CUSTOM (other providers: recorded
as not evaluated) -> AUDIT (mark) -> DENY -> ALLOW (default deny iff an enforced ALLOW policy selects
the workload) -> allow. Dry-run policies (``istio.io/dry-run``) are evaluated into a
:class:`~authz.decision.ShadowResult`, as Envoy's RBAC shadow rules, and never change the decision.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from authz.decision import Reason, ShadowResult, TraceEntry
from authz.policy.compile import CompiledPolicies, CompiledRule, PolicyGroup, _rule_key
from authz.policy.matchers import RequestView
from authz.policy.model import Action
from authz.request import Request, RequestAuth, Workload

__all__ = ["NO_ALLOW_MATCH_POLICY_ID", "PolicyResult", "evaluate"]

NO_ALLOW_MATCH_POLICY_ID = "none"  # Envoy rbac_access_denied_matched_policy[none]


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """The authorization answer. ``policy_id`` is ``ns[<ns>]-policy[<name>]-rule[<i>]`` of the DENY or
    ALLOW rule that decided, ``"none"`` when ALLOW policies exist and none matched, ``""`` when no
    policy decided. ``audit_policy_id`` names the AUDIT rule that marked the request."""

    allowed: bool
    reason: str
    policy_id: str
    trace: tuple[TraceEntry, ...] = ()
    audit: bool = False
    audit_policy_id: str = ""
    shadow: ShadowResult | None = None
    normalized_path: str = ""


@dataclass(frozen=True, slots=True)
class _Lookup:
    """The attributes the rule index is keyed by; all ``None`` on TCP."""

    tcp: bool
    path: str | None
    method: str | None
    host: str | None


def _lookup(request: Request, path: str) -> _Lookup:
    http = request.http
    if http is None:
        return _Lookup(True, None, None, None)
    # As RequestView sees them (authz.policy.matchers): the normalized path, the raw method, the
    # host or None when empty.
    return _Lookup(False, path, http.method, http.host or None)


def _candidates(
    groups: Iterable[PolicyGroup], action: Action, dry_run: bool, at: _Lookup
) -> Iterable[CompiledRule]:
    """Rules of ``action`` that could match, merged across groups in Envoy's order (rule id)."""
    lists = []
    for group in groups:
        rs = group.rules(action, dry_run, at.tcp)
        if rs:
            found = rs.candidates(at.path, at.method, at.host)
            if found:
                lists.append(found)
    if not lists:
        return ()
    if len(lists) == 1:
        return lists[0]
    return heapq.merge(*lists, key=_rule_key)


def _first_match(
    rules: Iterable[CompiledRule], view: RequestView, stage: str, trace: list[TraceEntry]
) -> CompiledRule | None:
    for rule in rules:
        failed = rule.failure(view)
        policy = rule.policy.policy_name
        if failed is None:
            trace.append(TraceEntry(stage, policy, rule.index, True, clause=f"rules[{rule.index}]"))
            return rule
        trace.append(TraceEntry(stage, policy, rule.index, False, clause=failed))
    return None


def evaluate(
    compiled: CompiledPolicies,
    request: Request,
    workload: Workload,
    auth: RequestAuth | None,
    *,
    path: str,
) -> PolicyResult:
    """Decide ``request`` for ``workload``. ``path`` is the normalized path without query
    (:func:`authz.policy.normalize.normalize_path`); ``request.http is None`` means TCP."""
    view = RequestView(request, auth, path)
    at = _lookup(request, path)
    groups = compiled.groups_for(workload)
    trace: list[TraceEntry] = []

    # 1. CUSTOM: delegated to other providers, never decided here (spec §1.4 step 1).
    for group in groups:
        for policy in group.custom:
            trace.append(
                TraceEntry(
                    "custom",
                    policy.policy_name,
                    None,
                    False,
                    clause=f"not evaluated: CUSTOM provider {policy.provider!r}",
                )
            )

    # 3. AUDIT marks the request; the decision is unchanged.
    audit = _first_match(_candidates(groups, Action.AUDIT, False, at), view, "audit", trace)
    audit_id = audit.rule_id if audit else ""

    # Dry-run DENY runs as the DENY filter's shadow engine.
    shadow: ShadowResult | None = None
    if any(g.has_dry_run.get(Action.DENY) for g in groups):
        dry_deny = _first_match(_candidates(groups, Action.DENY, True, at), view, "dry-run-deny", trace)
        shadow = ShadowResult(allowed=dry_deny is None, policy_id=dry_deny.rule_id if dry_deny else "")

    # 4. DENY
    deny = _first_match(_candidates(groups, Action.DENY, False, at), view, "deny", trace)
    if deny is not None:
        return PolicyResult(
            allowed=False,
            reason=Reason.DENIED_BY_POLICY,
            policy_id=deny.rule_id,
            trace=tuple(trace),
            audit=audit is not None,
            audit_policy_id=audit_id,
            shadow=shadow,
            normalized_path=path,
        )

    # Dry-run ALLOW runs as the ALLOW filter's shadow engine (reached only if DENY did not deny).
    if any(g.has_dry_run.get(Action.ALLOW) for g in groups) and (shadow is None or shadow.allowed):
        dry_allow = _first_match(_candidates(groups, Action.ALLOW, True, at), view, "dry-run-allow", trace)
        shadow = ShadowResult(
            allowed=dry_allow is not None,
            policy_id=dry_allow.rule_id if dry_allow else NO_ALLOW_MATCH_POLICY_ID,
        )

    # 5. ALLOW: default deny iff an enforced ALLOW policy selects the workload.
    if any(g.has_enforced_allow for g in groups):
        allow = _first_match(_candidates(groups, Action.ALLOW, False, at), view, "allow", trace)
        if allow is None:
            return PolicyResult(
                allowed=False,
                reason=Reason.NO_ALLOW_MATCH,
                policy_id=NO_ALLOW_MATCH_POLICY_ID,
                trace=tuple(trace),
                audit=audit is not None,
                audit_policy_id=audit_id,
                shadow=shadow,
                normalized_path=path,
            )
        return PolicyResult(
            allowed=True,
            reason=Reason.ALLOWED_BY_POLICY,
            policy_id=allow.rule_id,
            trace=tuple(trace),
            audit=audit is not None,
            audit_policy_id=audit_id,
            shadow=shadow,
            normalized_path=path,
        )

    # 6. allow
    return PolicyResult(
        allowed=True,
        reason=Reason.ALLOWED_NO_POLICY,
        policy_id="",
        trace=tuple(trace),
        audit=audit is not None,
        audit_policy_id=audit_id,
        shadow=shadow,
        normalized_path=path,
    )

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

from authz.decision import Reason, ShadowResult, TraceEntry, value_builder
from authz.policy.compile import (
    MAX_MEMOIZED_OUTCOMES,
    CompiledPolicies,
    CompiledRule,
    EvaluationPlan,
    _rule_key,
)
from authz.policy.index import RuleIndex
from authz.policy.matchers import RequestView
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


_build_result = value_builder(PolicyResult)  # PolicyResult(...) at half the cost: one per check


def _candidates(
    indexes: tuple[RuleIndex[CompiledRule], ...], path: str | None, method: str | None, host: str | None
) -> Iterable[CompiledRule]:
    """Rules of one stage that could match, merged across groups in Envoy's order (rule id)."""
    if len(indexes) == 1:  # one group: its candidates are already in order
        return indexes[0].candidates(path, method, host)
    lists = []
    for index in indexes:
        found = index.candidates(path, method, host)
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
        trace.append(rule.trace_entry(stage, failed))  # shared, immutable entries: no allocation
        if failed is None:
            return rule
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
    plan = compiled.plan_for(workload)
    inputs = plan.inputs
    if inputs is None:
        return _evaluate(plan, RequestView(request, auth, path), request, path)
    # The outcome is a pure function of the plan and of what its rules read (EvaluationPlan.inputs); the
    # token identity is keyed by the RequestAuth object, held by the entry so that its id stays unique.
    http = request.http
    if http is None:
        key: tuple[object, ...] = (None, path, None, None, id(auth))
    else:
        key = (True, path, http.method, http.host, id(auth))
    view = None
    if inputs:  # the request's view is built only when something reads it (or on a miss)
        view = RequestView(request, auth, path)
        key = (*key, *[read(view) for read in inputs])
    memo = plan.memo
    hit = memo.get(key)
    if hit is not None and hit[0] is auth:
        return hit[1]  # type: ignore[return-value]
    if view is None:
        view = RequestView(request, auth, path)
    result = _evaluate(plan, view, request, path)
    if len(memo) >= MAX_MEMOIZED_OUTCOMES:
        memo.clear()
    memo[key] = (auth, result)
    return result


def _evaluate(plan: EvaluationPlan, view: RequestView, request: Request, path: str) -> PolicyResult:
    http = request.http
    # The attributes the rule index is keyed by, as RequestView sees them (authz.policy.matchers): the
    # normalized path, the raw method, the host or None when empty; all None on TCP.
    if http is None:
        stages = plan.tcp
        at_path = method = host = None
    else:
        stages = plan.http
        at_path, method, host = path, http.method, http.host or None

    # 1. CUSTOM: delegated to other providers, never decided here (spec §1.4 step 1).
    trace: list[TraceEntry] = list(plan.custom)

    # 3. AUDIT marks the request; the decision is unchanged.
    audit = None
    if stages.audit:
        audit = _first_match(_candidates(stages.audit, at_path, method, host), view, "audit", trace)
    audit_id = audit.rule_id if audit else ""

    # Dry-run DENY runs as the DENY filter's shadow engine.
    shadow: ShadowResult | None = None
    if stages.dry_deny is not None:
        dry_deny = _first_match(
            _candidates(stages.dry_deny, at_path, method, host), view, "dry-run-deny", trace
        )
        shadow = ShadowResult(allowed=dry_deny is None, policy_id=dry_deny.rule_id if dry_deny else "")

    # 4. DENY
    if stages.deny:
        deny = _first_match(_candidates(stages.deny, at_path, method, host), view, "deny", trace)
        if deny is not None:
            return _build_result(
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
    if stages.dry_allow is not None and (shadow is None or shadow.allowed):
        dry_allow = _first_match(
            _candidates(stages.dry_allow, at_path, method, host), view, "dry-run-allow", trace
        )
        shadow = ShadowResult(
            allowed=dry_allow is not None,
            policy_id=dry_allow.rule_id if dry_allow else NO_ALLOW_MATCH_POLICY_ID,
        )

    # 5. ALLOW: default deny iff an enforced ALLOW policy selects the workload.
    if stages.allow is not None:
        allow = _first_match(_candidates(stages.allow, at_path, method, host), view, "allow", trace)
        if allow is None:
            return _build_result(
                allowed=False,
                reason=Reason.NO_ALLOW_MATCH,
                policy_id=NO_ALLOW_MATCH_POLICY_ID,
                trace=tuple(trace),
                audit=audit is not None,
                audit_policy_id=audit_id,
                shadow=shadow,
                normalized_path=path,
            )
        return _build_result(
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
    return _build_result(
        allowed=True,
        reason=Reason.ALLOWED_NO_POLICY,
        policy_id="",
        trace=tuple(trace),
        audit=audit is not None,
        audit_policy_id=audit_id,
        shadow=shadow,
        normalized_path=path,
    )

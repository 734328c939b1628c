"""Compile validated policies once into indexed matchers; :mod:`authz.policy.evaluate` reads them.

* Scope: policies are grouped by (namespace, selector); a workload finds its groups through a
  (label key, value) index, so selection cost follows the groups that can apply, not their count.
* Rules: within a group and action, a rule whose every ``to`` entry lists only exact ``paths`` is
  indexed by those paths; only rules indexed under the request path, plus the unindexed ones, are
  evaluated.
* TCP: each rule has an HTTP and a TCP variant (spec §1.9; istio model.go ``checkError``):
  an ALLOW rule that uses any HTTP-only field is dropped on TCP; DENY/AUDIT/CUSTOM rules lose their
  HTTP-only matchers (an entry left empty matches anything).
* Candidates are evaluated in the order of their rule id, which is the order of Envoy's RBAC policy
  map, so the reported policy id is the one Envoy would report.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from authz.config import DEFAULT_MESH, MeshConfig
from authz.policy.matchers import RequestView, ValuePredicate, value_predicate
from authz.policy.model import MATCH_ANY_TEMPLATE, MATCH_ONE_TEMPLATE, Action, AuthorizationPolicy, FieldMatch
from authz.request import Workload
from authz.workload import selects

__all__ = ["CompiledField", "CompiledPolicies", "CompiledRule", "PolicyGroup", "RuleSet", "compile_policies"]


@dataclass(frozen=True, slots=True)
class CompiledField:
    """One field or condition with its predicates; ``failure`` names it when it does not match."""

    match: FieldMatch
    clause: str
    not_clause: str
    positive: tuple[ValuePredicate, ...]
    negative: tuple[ValuePredicate, ...]

    def failure(self, view: RequestView) -> str | None:
        """``None`` if the field matches, else the clause (``from[0].source.principals``) that failed."""
        if self.positive and not any(p(view) for p in self.positive):
            return self.clause
        if self.negative and any(p(view) for p in self.negative):
            return self.not_clause
        return None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    policy: AuthorizationPolicy
    index: int
    rule_id: str
    sources: tuple[tuple[CompiledField, ...], ...] | None
    operations: tuple[tuple[CompiledField, ...], ...] | None
    conditions: tuple[CompiledField, ...]

    def failure(self, view: RequestView) -> str | None:
        """``None`` if the rule matches; else the first clause that failed (spec §1.5)."""
        if self.operations is not None:
            failed = _first_entry_failure(self.operations, view)
            if failed is not None:
                return failed
        if self.sources is not None:
            failed = _first_entry_failure(self.sources, view)
            if failed is not None:
                return failed
        for cond in self.conditions:
            failed = cond.failure(view)
            if failed is not None:
                return failed
        return None


def _first_entry_failure(entries: tuple[tuple[CompiledField, ...], ...], view: RequestView) -> str | None:
    """OR over entries, AND inside an entry. Returns the failures joined by `` | `` if none matched."""
    failures: list[str] = []
    for entry in entries:
        for f in entry:
            failed = f.failure(view)
            if failed is not None:
                failures.append(failed)
                break
        else:
            return None
    return " | ".join(failures) if failures else None


@dataclass(slots=True)
class RuleSet:
    """Rules of one action in one group, for one protocol (HTTP or TCP)."""

    by_path: dict[str, list[CompiledRule]] = field(default_factory=dict)
    unindexed: list[CompiledRule] = field(default_factory=list)

    def add(self, rule: CompiledRule, paths: frozenset[str] | None) -> None:
        if paths is None:
            self.unindexed.append(rule)
        else:
            for p in paths:
                self.by_path.setdefault(p, []).append(rule)

    def candidates(self, path: str | None) -> list[CompiledRule]:
        if path is None or not self.by_path:
            return self.unindexed
        hit = self.by_path.get(path)
        if not hit:
            return self.unindexed
        if not self.unindexed:
            return hit
        return list(heapq.merge(self.unindexed, hit, key=_rule_key))

    def finish(self) -> None:
        self.unindexed.sort(key=_rule_key)
        for rules in self.by_path.values():
            rules.sort(key=_rule_key)

    def __bool__(self) -> bool:
        return bool(self.unindexed or self.by_path)


def _rule_key(rule: CompiledRule) -> str:
    return rule.rule_id


@dataclass(slots=True)
class PolicyGroup:
    """Policies sharing a namespace and selector, split by action and enforcement."""

    namespace: str
    selector: Mapping[str, str] | None
    policies: list[AuthorizationPolicy] = field(default_factory=list)
    http: dict[tuple[Action, bool], RuleSet] = field(default_factory=dict)
    tcp: dict[tuple[Action, bool], RuleSet] = field(default_factory=dict)
    has_enforced_allow: bool = False
    has_dry_run: dict[Action, bool] = field(default_factory=dict)
    custom: list[AuthorizationPolicy] = field(default_factory=list)

    def rules(self, action: Action, dry_run: bool, tcp: bool) -> RuleSet | None:
        return (self.tcp if tcp else self.http).get((action, dry_run))


def _compile_field(
    fm: FieldMatch, clause_prefix: str, policy: AuthorizationPolicy, mesh: MeshConfig, *, condition: bool
) -> CompiledField:
    def preds(values: Iterable[str]) -> tuple[ValuePredicate, ...]:
        out: list[ValuePredicate] = []
        for v in values:
            out.extend(value_predicate(fm, v, policy_namespace=policy.namespace, mesh=mesh))
        return tuple(out)

    if condition:
        clause, not_clause = f"{clause_prefix}.values", f"{clause_prefix}.notValues"
    else:
        clause, not_clause = f"{clause_prefix}.{fm.field}", f"{clause_prefix}.{fm.not_field}"
    return CompiledField(
        match=fm,
        clause=clause,
        not_clause=not_clause,
        positive=preds(fm.values),
        negative=preds(fm.not_values),
    )


def _exact_paths(rule_ops: tuple[tuple[FieldMatch, ...], ...] | None) -> frozenset[str] | None:
    """The exact paths a rule can match, if every ``to`` entry restricts the path to exact values."""
    if not rule_ops:
        return None
    out: set[str] = set()
    for entry in rule_ops:
        paths = next((m for m in entry if m.attribute == "request.path" and m.values), None)
        if paths is None:
            return None
        for v in paths.values:
            if "*" in v or MATCH_ONE_TEMPLATE in v or MATCH_ANY_TEMPLATE in v:
                return None
            out.add(v)
    return frozenset(out)


def _compile_rule(
    policy: AuthorizationPolicy, index: int, mesh: MeshConfig, *, tcp: bool
) -> tuple[CompiledRule, frozenset[str] | None] | None:
    """Compile rule ``index``; for TCP apply istio's drop (ALLOW) / widen (others) rule."""
    assert policy.rules is not None
    rule = policy.rules[index]
    if tcp and policy.action is Action.ALLOW and rule.http_only_fields:
        return None

    def keep(fm: FieldMatch) -> bool:
        return not (tcp and fm.http_only)

    def entries(
        groups: tuple[tuple[FieldMatch, ...], ...] | None, name: str, item: str
    ) -> tuple[tuple[CompiledField, ...], ...] | None:
        if groups is None:
            return None
        out: list[tuple[CompiledField, ...]] = []
        for i, group in enumerate(groups):
            kept = tuple(
                _compile_field(fm, f"{name}[{i}].{item}", policy, mesh, condition=False)
                for fm in group
                if keep(fm)
            )
            if not kept:
                return None  # an entry left empty is `any: true`, so the whole OR matches
            out.append(kept)
        return tuple(out)

    compiled = CompiledRule(
        policy=policy,
        index=index,
        rule_id=policy.rule_id(index),
        sources=entries(rule.sources, "from", "source"),
        operations=entries(rule.operations, "to", "operation"),
        conditions=tuple(
            _compile_field(fm, f"when[{i}]", policy, mesh, condition=True)
            for i, fm in enumerate(rule.conditions)
            if keep(fm)
        ),
    )
    return compiled, (None if tcp else _exact_paths(rule.operations))


# Per namespace: groups without a selector, and groups indexed by one (label key, value) of their selector.
_NamespaceGroups = tuple[tuple[PolicyGroup, ...], Mapping[tuple[str, str], tuple[PolicyGroup, ...]]]


@dataclass(frozen=True, slots=True)
class CompiledPolicies:
    """The compiled, indexed policy set; immutable, so a reload swaps it atomically."""

    mesh: MeshConfig
    policies: tuple[AuthorizationPolicy, ...]
    groups_by_namespace: Mapping[
        str, tuple[tuple[PolicyGroup, ...], Mapping[tuple[str, str], tuple[PolicyGroup, ...]]]
    ]

    def groups_for(self, workload: Workload) -> list[PolicyGroup]:
        """Groups whose policies select ``workload`` (root namespace + its own; spec §1.2)."""
        out: list[PolicyGroup] = []
        namespaces = [self.mesh.root_namespace]
        if workload.namespace != self.mesh.root_namespace:
            namespaces.append(workload.namespace)
        for ns in namespaces:
            entry = self.groups_by_namespace.get(ns)
            if entry is None:
                continue
            unselected, by_label = entry
            out.extend(unselected)
            seen: set[int] = set()
            for item in workload.labels.items():
                for group in by_label.get(item, ()):
                    if id(group) in seen:
                        continue
                    seen.add(id(group))
                    if selects(
                        group.namespace, group.selector, workload, root_namespace=self.mesh.root_namespace
                    ):
                        out.append(group)
        return out


def compile_policies(
    policies: Sequence[AuthorizationPolicy], mesh: MeshConfig = DEFAULT_MESH
) -> CompiledPolicies:
    """Compile ``policies`` for ``mesh`` (trust domain aliases, root namespace)."""
    groups: dict[tuple[str, frozenset[tuple[str, str]] | None], PolicyGroup] = {}
    for policy in policies:
        if policy.target_refs:
            # Only gateways/waypoints honour targetRefs; a sidecar workload ignores these policies
            # (istio pilot/pkg/model/policyattachment.go ShouldAttachPolicy).
            continue
        sel_key = frozenset(policy.selector.items()) if policy.selector else None
        key = (policy.namespace, sel_key)
        group = groups.get(key)
        if group is None:
            group = groups[key] = PolicyGroup(
                namespace=policy.namespace, selector=dict(policy.selector) if policy.selector else None
            )
        group.policies.append(policy)
        if policy.action is Action.CUSTOM:
            group.custom.append(policy)
            continue
        if policy.action is Action.ALLOW and not policy.dry_run:
            group.has_enforced_allow = True
        if policy.dry_run:
            group.has_dry_run[policy.action] = True
        for tcp, table in ((False, group.http), (True, group.tcp)):
            rs = table.setdefault((policy.action, policy.dry_run), RuleSet())
            for i in range(len(policy.rules or ())):
                compiled = _compile_rule(policy, i, mesh, tcp=tcp)
                if compiled is not None:
                    rs.add(*compiled)
    by_ns: dict[str, tuple[list[PolicyGroup], dict[tuple[str, str], list[PolicyGroup]]]] = {}
    for group in groups.values():
        for table in (group.http, group.tcp):
            for rs in table.values():
                rs.finish()
        group.custom.sort(key=lambda p: p.policy_name)
        unselected, by_label = by_ns.setdefault(group.namespace, ([], {}))
        if not group.selector:
            unselected.append(group)
        else:
            # Index under one label (the smallest item); the full selector is checked at lookup.
            by_label.setdefault(min(group.selector.items()), []).append(group)
    frozen = {
        ns: (tuple(unsel), {k: tuple(v) for k, v in labels.items()}) for ns, (unsel, labels) in by_ns.items()
    }
    return CompiledPolicies(mesh=mesh, policies=tuple(policies), groups_by_namespace=frozen)

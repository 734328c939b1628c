"""Compile validated policies once into indexed matchers; :mod:`authz.policy.evaluate` reads them.

* Scope: policies are grouped by (namespace, selector); a workload finds its groups through a
  (label key, value) index, so selection cost follows the groups that can apply, not their count.
* Rules: within a group and action, rules are indexed by what their ``to`` entries require of the
  path, host or method (exact, prefix, suffix; :mod:`authz.policy.index`); only the rules the request
  can satisfy there, plus the unindexable ones, are evaluated.
* TCP: each rule has an HTTP and a TCP variant (spec §1.9; istio model.go ``checkError``):
  an ALLOW rule that uses any HTTP-only field is dropped on TCP; DENY/AUDIT/CUSTOM rules lose their
  HTTP-only matchers (an entry left empty matches anything).
* Candidates are evaluated in the order of their rule id, which is the order of Envoy's RBAC policy
  map, so the reported policy id is the one Envoy would report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from authz.config import DEFAULT_MESH, MeshConfig
from authz.decision import TraceEntry
from authz.policy.index import INDEX_MIN_RULES, RuleIndex, RuleKeys, build_rule_index, operation_keys
from authz.policy.matchers import RequestView, ValuePredicate, value_predicate
from authz.policy.model import Action, AuthorizationPolicy, FieldMatch
from authz.request import RequestAuth, Workload
from authz.workload import selects

__all__ = [
    "MAX_MEMOIZED_OUTCOMES",
    "CompiledField",
    "CompiledPolicies",
    "CompiledRule",
    "EvaluationPlan",
    "InputReader",
    "PolicyGroup",
    "RuleSet",
    "StagePlan",
    "compile_policies",
    "evaluation_plan",
]


# Attributes that are a function of the verified token alone (matchers.value_predicate reads them from
# ``view.auth``, and only on HTTP): their outcome is memoized per RequestAuth object, which the
# authenticator shares between the checks carrying the same cached token.
AUTH_ATTRIBUTES = frozenset(
    {"request.auth.principal", "request.auth.audiences", "request.auth.presenter", "request.auth.claims"}
)
# Identities whose outcome a field keeps; past it the memo is dropped whole (cold-token floods).
MAX_MEMOIZED_IDENTITIES = 4096


@dataclass(frozen=True, slots=True)
class CompiledField:
    """One field or condition with its predicates; ``failure`` names it when it does not match."""

    match: FieldMatch
    clause: str
    not_clause: str
    positive: tuple[ValuePredicate, ...]
    negative: tuple[ValuePredicate, ...]
    # id(auth) -> (auth, outcome) for AUTH_ATTRIBUTES fields; the auth is held, so its id stays unique.
    _by_auth: dict[int, tuple[RequestAuth, str | None]] | None = field(
        default=None, compare=False, repr=False
    )

    def failure(self, view: RequestView) -> str | None:
        """``None`` if the field matches, else the clause (``from[0].source.principals``) that failed."""
        memo = self._by_auth
        auth = view.auth
        if memo is None or auth is None or view.http is None:
            return self._failure(view)
        hit = memo.get(id(auth))
        if hit is not None and hit[0] is auth:
            return hit[1]
        failed = self._failure(view)
        if len(memo) >= MAX_MEMOIZED_IDENTITIES:
            memo.clear()
        memo[id(auth)] = (auth, failed)
        return failed

    def _failure(self, view: RequestView) -> str | None:
        # Plain loops, not any(<generator>): this runs for every candidate rule of every check.
        if self.positive:
            for p in self.positive:
                if p(view):
                    break
            else:
                return self.clause
        for p in self.negative:
            if p(view):
                return self.not_clause
        return None


# Distinct trace entries kept per rule: one per (stage, failed clause); a rule has few clauses, so the
# bound only matters for rules with many ``from``/``to`` alternatives.
MAX_TRACE_ENTRIES_PER_RULE = 64


@dataclass(frozen=True, slots=True)
class CompiledRule:
    policy: AuthorizationPolicy
    index: int
    rule_id: str
    sources: tuple[tuple[CompiledField, ...], ...] | None
    operations: tuple[tuple[CompiledField, ...], ...] | None
    conditions: tuple[CompiledField, ...]
    # The AND of every check of the rule, in the order of :meth:`failure`, when ``from`` and ``to`` have
    # at most one entry each (the common case): evaluated as one flat loop.
    flat: tuple[CompiledField, ...] | None = field(default=None, compare=False, repr=False)
    # Trace entries are values: built once per (stage, clause) and shared by every check.
    _entries: dict[tuple[str, str | None], TraceEntry] = field(
        default_factory=dict, compare=False, repr=False
    )

    def failure(self, view: RequestView) -> str | None:
        """``None`` if the rule matches; else the first clause that failed (spec §1.5)."""
        flat = self.flat
        if flat is not None:
            for f in flat:
                failed = f.failure(view)
                if failed is not None:
                    return failed
            return None
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

    def trace_entry(self, stage: str, failed: str | None) -> TraceEntry:
        """The trace entry for this rule at ``stage``: matched when ``failed`` is ``None``, else naming
        the clause that failed. Entries are immutable, so each distinct one is built once."""
        entry = self._entries.get((stage, failed))
        if entry is None:
            policy = self.policy.policy_name
            if failed is None:
                entry = TraceEntry(stage, policy, self.index, True, clause=f"rules[{self.index}]")
            else:
                entry = TraceEntry(stage, policy, self.index, False, clause=failed)
            if len(self._entries) < MAX_TRACE_ENTRIES_PER_RULE:
                self._entries[(stage, failed)] = entry
        return entry


def _flat_checks(
    sources: tuple[tuple[CompiledField, ...], ...] | None,
    operations: tuple[tuple[CompiledField, ...], ...] | None,
    conditions: tuple[CompiledField, ...],
) -> tuple[CompiledField, ...] | None:
    """The rule's checks as one AND (operations, sources, conditions: :meth:`CompiledRule.failure`'s
    order), or ``None`` when ``from`` or ``to`` is an OR of several entries."""
    if (sources is not None and len(sources) > 1) or (operations is not None and len(operations) > 1):
        return None
    return (*(operations[0] if operations else ()), *(sources[0] if sources else ()), *conditions)


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
    """Rules of one action in one group, for one protocol (HTTP or TCP), in Envoy's order once
    :meth:`finish` has run; :meth:`candidates` narrows them through a :class:`RuleIndex`."""

    pending: list[tuple[CompiledRule, RuleKeys | None]] = field(default_factory=list)
    index: RuleIndex[CompiledRule] | None = None

    def add(self, rule: CompiledRule, keys: RuleKeys | None) -> None:
        self.pending.append((rule, keys))

    def finish(self, *, index_min_rules: int = INDEX_MIN_RULES) -> None:
        self.pending.sort(key=lambda item: _rule_key(item[0]))
        self.index = build_rule_index(self.pending, min_rules=index_min_rules)
        self.pending = []

    def candidates(self, path: str | None, method: str | None, host: str | None) -> Sequence[CompiledRule]:
        """The rules that could match an HTTP request with these attributes (``None`` for TCP), in
        Envoy's order."""
        assert self.index is not None, "RuleSet.finish() not called"
        return self.index.candidates(path, method, host)

    def __bool__(self) -> bool:
        return bool(self.pending or (self.index is not None and self.index.rules))


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
        _by_auth={} if fm.attribute in AUTH_ATTRIBUTES else None,
    )


def _compile_rule(
    policy: AuthorizationPolicy, index: int, mesh: MeshConfig, *, tcp: bool
) -> tuple[CompiledRule, RuleKeys | None] | None:
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

    sources = entries(rule.sources, "from", "source")
    operations = entries(rule.operations, "to", "operation")
    conditions = tuple(
        _compile_field(fm, f"when[{i}]", policy, mesh, condition=True)
        for i, fm in enumerate(rule.conditions)
        if keep(fm)
    )
    compiled = CompiledRule(
        policy=policy,
        index=index,
        rule_id=policy.rule_id(index),
        sources=sources,
        operations=operations,
        conditions=conditions,
        flat=_flat_checks(sources, operations, conditions),
    )
    # Every indexed attribute is HTTP-only, so the TCP variant is never indexed.
    return compiled, (None if tcp else operation_keys(rule.operations))


# Per namespace: groups without a selector, and groups indexed by one (label key, value) of their selector.
_NamespaceGroups = tuple[tuple[PolicyGroup, ...], Mapping[tuple[str, str], tuple[PolicyGroup, ...]]]

# Workloads whose evaluation plan is memoized. A sidecar authorizer sees one workload, a shared one a few
# hundred; past the bound the memo is dropped whole and rebuilt from the traffic that follows.
MAX_CACHED_PLANS = 1024


@dataclass(frozen=True, slots=True)
class StagePlan:
    """For one workload and protocol: the non-empty rule indexes (:class:`RuleSet` ``index``) of each
    evaluation stage, across the workload's groups, in group order. ``dry_deny``/``dry_allow`` are
    ``None`` when no dry-run policy of that action selects the workload; ``allow`` is ``None`` when no
    enforced ALLOW policy does."""

    audit: tuple[RuleIndex[CompiledRule], ...]
    dry_deny: tuple[RuleIndex[CompiledRule], ...] | None
    deny: tuple[RuleIndex[CompiledRule], ...]
    dry_allow: tuple[RuleIndex[CompiledRule], ...] | None
    allow: tuple[RuleIndex[CompiledRule], ...] | None


InputReader = Callable[[RequestView], object]
"""Reads one request attribute a plan's rules depend on (a hashable value) from a :class:`RequestView`."""

# Outcomes an EvaluationPlan remembers; past the bound the memo is dropped whole (floods of distinct
# requests or tokens only cost the memo's upkeep).
MAX_MEMOIZED_OUTCOMES = 4096


@dataclass(frozen=True, slots=True)
class EvaluationPlan:
    """Everything :func:`authz.policy.evaluate.evaluate` needs about a workload's policies, computed
    once per workload: the CUSTOM trace entries and a :class:`StagePlan` per protocol.

    ``inputs`` reads every request attribute that any of the plan's rules looks at beyond the ones every
    evaluation keys on (protocol, normalized path, method, host, the token identity): the outcome of
    evaluating the plan is a pure function of those values, so ``memo`` keeps outcomes by them.
    ``inputs`` is ``None`` when a rule reads something that cannot key a memo (dynamic metadata).
    """

    groups: tuple[PolicyGroup, ...]
    custom: tuple[TraceEntry, ...]
    http: StagePlan
    tcp: StagePlan
    inputs: tuple[InputReader, ...] | None = None
    memo: dict[tuple[object, ...], tuple[object, object]] = field(
        default_factory=dict, compare=False, repr=False
    )


def _source_principal(view: RequestView) -> object:
    return view.request.source.principal


def _source_ip(view: RequestView) -> object:
    return view.request.source.address


def _remote_ip(view: RequestView) -> object:
    return view.request.remote_ip or view.request.source.address


def _destination_ip(view: RequestView) -> object:
    return view.request.destination.address


def _destination_port(view: RequestView) -> object:
    return view.request.destination.port


def _sni(view: RequestView) -> object:
    return view.request.sni


# What each attribute's predicates (authz.policy.matchers.value_predicate) read, beyond the key every
# evaluation has: None = nothing more (path, method, host, request.auth.*: keyed always).
_INPUT_OF_ATTRIBUTE: dict[str, InputReader | None] = {
    "source.principal": _source_principal,
    "source.namespace": _source_principal,
    "source.serviceAccount": _source_principal,
    "source.trustDomain": _source_principal,
    "source.ip": _source_ip,
    "remote.ip": _remote_ip,
    "destination.ip": _destination_ip,
    "destination.port": _destination_port,
    "connection.sni": _sni,
    "request.host": None,
    "request.method": None,
    "request.path": None,
    "request.auth.principal": None,
    "request.auth.audiences": None,
    "request.auth.presenter": None,
    "request.auth.claims": None,
}


def _header_input(name: str) -> InputReader:
    def read(view: RequestView) -> object:
        return view.header(name)

    return read


def _plan_inputs(stages: Sequence[StagePlan]) -> tuple[InputReader, ...] | None:
    """The readers of every attribute the rules of ``stages`` match on, or None if one cannot be keyed."""
    readers: dict[object, InputReader] = {}
    for stage in stages:
        for indexes in (stage.audit, stage.dry_deny, stage.deny, stage.dry_allow, stage.allow):
            for index in indexes or ():
                for rule in index.rules:
                    for match in _field_matches(rule):
                        attribute = match.attribute
                        if attribute == "request.headers":
                            readers.setdefault(("header", match.key[0]), _header_input(match.key[0]))
                        elif attribute in _INPUT_OF_ATTRIBUTE:
                            reader = _INPUT_OF_ATTRIBUTE[attribute]
                            if reader is not None:
                                readers.setdefault(attribute, reader)
                        else:  # experimental.envoy.filters (request metadata) or anything new: no memo
                            return None
    return tuple(readers.values())


def _field_matches(rule: CompiledRule) -> Iterable[FieldMatch]:
    for entries in (rule.sources or (), rule.operations or ()):
        for entry in entries:
            for compiled in entry:
                yield compiled.match
    for compiled in rule.conditions:
        yield compiled.match


def _stage_plan(groups: Sequence[PolicyGroup], *, tcp: bool) -> StagePlan:
    def sets(action: Action, dry_run: bool) -> tuple[RuleIndex[CompiledRule], ...]:
        found = (g.rules(action, dry_run, tcp) for g in groups)
        return tuple(rs.index for rs in found if rs is not None and rs.index is not None and rs.index.rules)

    has_dry_deny = any(g.has_dry_run.get(Action.DENY) for g in groups)
    has_dry_allow = any(g.has_dry_run.get(Action.ALLOW) for g in groups)
    has_allow = any(g.has_enforced_allow for g in groups)
    return StagePlan(
        audit=sets(Action.AUDIT, False),
        dry_deny=sets(Action.DENY, True) if has_dry_deny else None,
        deny=sets(Action.DENY, False),
        dry_allow=sets(Action.ALLOW, True) if has_dry_allow else None,
        allow=sets(Action.ALLOW, False) if has_allow else None,
    )


def evaluation_plan(groups: Sequence[PolicyGroup]) -> EvaluationPlan:
    """The plan for a workload selected by ``groups`` (:meth:`CompiledPolicies.groups_for`)."""
    custom = tuple(
        TraceEntry(
            "custom",
            policy.policy_name,
            None,
            False,
            clause=f"not evaluated: CUSTOM provider {policy.provider!r}",
        )
        for group in groups
        for policy in group.custom
    )
    http = _stage_plan(groups, tcp=False)
    tcp = _stage_plan(groups, tcp=True)
    return EvaluationPlan(
        groups=tuple(groups), custom=custom, http=http, tcp=tcp, inputs=_plan_inputs((http, tcp))
    )


@dataclass(frozen=True, slots=True)
class CompiledPolicies:
    """The compiled, indexed policy set; immutable, so a reload swaps it atomically."""

    mesh: MeshConfig
    policies: tuple[AuthorizationPolicy, ...]
    groups_by_namespace: Mapping[
        str, tuple[tuple[PolicyGroup, ...], Mapping[tuple[str, str], tuple[PolicyGroup, ...]]]
    ]
    # Memos of :meth:`plan_for`: id(workload) -> (workload, plan), the workload held so that its id
    # cannot be reused by another object while the entry exists; and (namespace, labels) -> plan for
    # callers that build a new, equal Workload per request. Workloads are values: their labels must not
    # be mutated once built.
    _plans_by_id: dict[int, tuple[Workload, EvaluationPlan]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _plans: dict[tuple[str, frozenset[tuple[str, str]]], EvaluationPlan] = field(
        default_factory=dict, compare=False, repr=False
    )

    def plan_for(self, workload: Workload) -> EvaluationPlan:
        """The :class:`EvaluationPlan` of ``workload``, memoized: callers that reuse their
        :class:`Workload` values (the engine does) pay for scoping once per workload."""
        entry = self._plans_by_id.get(id(workload))
        if entry is not None and entry[0] is workload:
            return entry[1]
        key = (workload.namespace, frozenset(workload.labels.items()))
        plan = self._plans.get(key)
        if plan is None:
            plan = evaluation_plan(self.groups_for(workload))
            if len(self._plans) >= MAX_CACHED_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        if len(self._plans_by_id) >= MAX_CACHED_PLANS:
            self._plans_by_id.clear()
        self._plans_by_id[id(workload)] = (workload, plan)
        return plan

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
    policies: Sequence[AuthorizationPolicy],
    mesh: MeshConfig = DEFAULT_MESH,
    *,
    index_min_rules: int = INDEX_MIN_RULES,
) -> CompiledPolicies:
    """Compile ``policies`` for ``mesh`` (trust domain aliases, root namespace). Rule sets with fewer
    than ``index_min_rules`` rules are scanned whole (a huge value turns the index off: tests compare)."""
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
                rs.finish(index_min_rules=index_min_rules)
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

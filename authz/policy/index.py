"""A candidate index over rules, keyed by what their ``to`` operations require of the request.

A rule is a *candidate* for a request iff it could possibly match it. Only candidates need to be
evaluated; the index never decides, it only leaves out rules that cannot match, so the first match
in Envoy's order (:mod:`authz.policy.compile`) is unchanged.

What can be indexed is read off Istio's value matchers (:mod:`authz.policy.matchers`):

* ``paths``: ``/a`` exact, ``/a/*`` a plain string prefix ``/a/`` (istio matcher/string.go
  ``StringMatcherWithPrefix``: not segment based, ``/a/*`` does not match ``/a``), ``*.json`` a
  suffix, a template (``{*}``/``{**}``, istio matcher/template.go) by its literal leading part;
* ``hosts``: the same three forms compared case-insensitively (istio matcher/header.go
  ``HostMatcher`` sets ``ignore_case``);
* ``methods``: the same three forms, case-sensitive (istio matcher/header.go ``HeaderMatcher``).

The presence value ``*`` (Envoy ``present_match``) and ``not*`` lists do not narrow anything. A ``to``
entry is indexable if one of its fields is; a rule is indexed under every alternative of its ``to``
(an OR), and goes to the scan list if ``to`` is absent or any entry is not indexable. Each entry is
indexed by the field whose keys are shared by the fewest entries of the rule set, so a field every
rule has (``methods: [GET]``) does not crowd out a selective one (distinct path prefixes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, NamedTuple, TypeVar

from authz.policy.model import MATCH_ANY_TEMPLATE, MATCH_ONE_TEMPLATE, FieldMatch

__all__ = [
    "INDEXED_ATTRIBUTES",
    "INDEX_MIN_RULES",
    "IndexKey",
    "MatchKind",
    "RuleIndex",
    "RuleKeys",
    "build_rule_index",
    "entry_keys",
    "operation_keys",
    "value_key",
]

# The attributes an index is kept for, in order of preference when two are equally selective: a path
# usually names a resource, a host a service, a method is shared by many rules.
INDEXED_ATTRIBUTES: tuple[str, ...] = ("request.path", "request.host", "request.method")
# Smaller rule sets are scanned whole: evaluating a rule that fails on its first field costs about as
# much as one look-up (bench/micro.py), and the trace then names the failing clause of every rule,
# which is what someone reading `authz check` output on a small policy set wants to see.
INDEX_MIN_RULES = 8
_CASE_INSENSITIVE = frozenset({"request.host"})  # istio matcher/header.go HostMatcher: ignore_case

MatchKind = Literal["exact", "prefix", "suffix"]


class IndexKey(NamedTuple):
    """A request attribute must equal / start with / end with ``text`` (lower-cased for hosts).
    A tuple, so that hashing it (once per entry at compile time) is cheap."""

    attribute: str
    kind: MatchKind
    text: str


EntryKeys = dict[str, tuple[IndexKey, ...]]
"""For one ``to`` entry: attribute -> the keys of its positive values (any one of them may hold)."""
RuleKeys = tuple[EntryKeys, ...]
"""For one rule: the keys of each ``to`` entry (an OR); ``None`` instead when not indexable."""


def _template_literal_head(value: str) -> str:
    """The literal text before the first ``{*}``/``{**}`` (istio matcher/template.go: the template
    compiles to Envoy ``uri_template`` whose leading literal must match verbatim)."""
    found = [i for i in (value.find(MATCH_ONE_TEMPLATE), value.find(MATCH_ANY_TEMPLATE)) if i >= 0]
    return value[: min(found)] if found else value


def value_key(attribute: str, value: str) -> IndexKey | None:
    """The index key a request must satisfy for ``value`` of ``attribute`` to match, or ``None``.

    Mirrors :func:`authz.policy.matchers.path_matcher` and ``istio_string_matcher``: templates first
    (paths only), then ``*`` (presence: not indexable), ``*x`` suffix, ``x*`` prefix, else exact (a
    ``*`` in the middle is literal).
    """
    if attribute not in INDEXED_ATTRIBUTES:
        return None
    fold = attribute in _CASE_INSENSITIVE

    def key(kind: MatchKind, text: str) -> IndexKey | None:
        if not text:
            return None  # matches every request that has the attribute: narrows nothing
        return IndexKey(attribute, kind, text.lower() if fold else text)

    if attribute == "request.path" and (MATCH_ONE_TEMPLATE in value or MATCH_ANY_TEMPLATE in value):
        return key("prefix", _template_literal_head(value))
    if value == "*":
        return None
    if value.startswith("*"):
        return key("suffix", value[1:])
    if value.endswith("*"):
        return key("prefix", value[:-1])
    return key("exact", value)


def _field_keys(fm: FieldMatch) -> tuple[IndexKey, ...] | None:
    if not fm.values:
        return None  # only not-values (notPaths, ...): narrows nothing
    keys: list[IndexKey] = []
    for v in fm.values:
        k = value_key(fm.attribute, v)
        if k is None:
            return None
        if k not in keys:
            keys.append(k)
    return tuple(keys)


def entry_keys(entry: Sequence[FieldMatch]) -> EntryKeys:
    """Every indexable field of one ``to`` entry (fields are AND-ed, so any one of them narrows)."""
    out: EntryKeys = {}
    for fm in entry:
        keys = _field_keys(fm)
        if keys is not None and fm.attribute not in out:
            out[fm.attribute] = keys
    return out


def operation_keys(operations: Sequence[Sequence[FieldMatch]] | None) -> RuleKeys | None:
    """The keys of each ``to`` entry of a rule, or ``None`` if the rule must be scanned: ``to``
    absent (any operation) or some entry with no indexable field."""
    if not operations:
        return None
    out: list[EntryKeys] = []
    for entry in operations:
        keys = entry_keys(entry)
        if not keys:
            return None
        out.append(keys)
    return tuple(out)


@dataclass(slots=True)
class _TrieNode:
    children: dict[str, _TrieNode] = field(default_factory=dict)
    hits: list[int] = field(default_factory=list)


def _trie_insert(root: _TrieNode, text: str, position: int) -> None:
    node = root
    for ch in text:
        child = node.children.get(ch)
        if child is None:
            child = node.children[ch] = _TrieNode()
        node = child
    node.hits.append(position)


def _trie_walk(root: _TrieNode, text: str, out: list[list[int]]) -> None:
    """Append the hits of every key that is a prefix of ``text``; stops where the trie ends, so the cost
    is bounded by the longest stored key, not by ``text``."""
    node = root
    for ch in text:
        child = node.children.get(ch)
        if child is None:
            return
        node = child
        if node.hits:
            out.append(node.hits)


@dataclass(slots=True)
class _AttributeIndex:
    """Exact keys in a dict, prefixes in a character trie, suffixes in a trie of reversed keys."""

    fold: bool
    exact: dict[str, list[int]] = field(default_factory=dict)
    prefixes: _TrieNode | None = None
    suffixes: _TrieNode | None = None

    def add(self, key: IndexKey, position: int) -> None:
        if key.kind == "exact":
            self.exact.setdefault(key.text, []).append(position)
        elif key.kind == "prefix":
            if self.prefixes is None:
                self.prefixes = _TrieNode()
            _trie_insert(self.prefixes, key.text, position)
        else:
            if self.suffixes is None:
                self.suffixes = _TrieNode()
            _trie_insert(self.suffixes, key.text[::-1], position)

    def lookup(self, value: str, out: list[list[int]]) -> None:
        if self.fold:
            value = value.lower()
        hit = self.exact.get(value)
        if hit:
            out.append(hit)
        if self.prefixes is not None:
            _trie_walk(self.prefixes, value, out)
        if self.suffixes is not None:
            _trie_walk(self.suffixes, value[::-1], out)


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RuleIndex(Generic[T]):
    """Rules in evaluation order, with an index of those whose ``to`` can be narrowed down.

    ``candidates`` returns, in the same order, the scanned rules plus every indexed rule one of whose
    ``to`` entries the request can satisfy on its indexed field.
    """

    rules: tuple[T, ...]
    scan: tuple[T, ...]
    scan_positions: frozenset[int]
    by_path: _AttributeIndex | None = None
    by_host: _AttributeIndex | None = None
    by_method: _AttributeIndex | None = None

    @property
    def indexed(self) -> bool:
        return self.by_path is not None or self.by_host is not None or self.by_method is not None

    def candidates(self, path: str | None, method: str | None, host: str | None) -> Sequence[T]:
        """Candidate rules for an HTTP request with these attributes; pass ``None`` for all three on
        TCP (no indexed rule can match: every indexed attribute is HTTP-only)."""
        by_path, by_host, by_method = self.by_path, self.by_host, self.by_method
        if by_path is None and by_host is None and by_method is None:  # self.indexed, inlined
            return self.scan
        hits: list[list[int]] = []
        if path is not None and by_path is not None:
            by_path.lookup(path, hits)
        if host and by_host is not None:
            by_host.lookup(host, hits)
        if method is not None and by_method is not None:
            by_method.lookup(method, hits)
        if not hits:
            return self.scan
        rules = self.rules
        if len(hits) == 1 and not self.scan:
            return [rules[i] for i in hits[0]]
        positions = self.scan_positions.union(*hits)
        return [rules[i] for i in sorted(positions)]


def _entry_choice(keys: EntryKeys, shared: Counter[IndexKey]) -> tuple[IndexKey, ...]:
    """The keys of the entry's most selective field: the fewest entries sharing its keys."""
    best = min(
        keys,
        key=lambda attr: (sum(shared[k] for k in keys[attr]), INDEXED_ATTRIBUTES.index(attr)),
    )
    return keys[best]


def build_rule_index(
    ordered: Sequence[tuple[T, RuleKeys | None]], *, min_rules: int = INDEX_MIN_RULES
) -> RuleIndex[T]:
    """Index ``ordered`` (rules already in evaluation order, each with its :func:`operation_keys`);
    with fewer than ``min_rules`` rules, every rule is scanned."""
    if len(ordered) < min_rules:
        rules = tuple(rule for rule, _ in ordered)
        return RuleIndex(rules=rules, scan=rules, scan_positions=frozenset(range(len(rules))))
    shared: Counter[IndexKey] = Counter()
    for _, rule_keys in ordered:
        for entry in rule_keys or ():
            for keys in entry.values():
                shared.update(keys)
    indexes: dict[str, _AttributeIndex] = {}
    scan: list[T] = []
    scan_positions: set[int] = set()
    for position, (rule, rule_keys) in enumerate(ordered):
        if rule_keys is None:
            scan.append(rule)
            scan_positions.add(position)
            continue
        chosen = {k for entry in rule_keys for k in _entry_choice(entry, shared)}
        for k in sorted(chosen):
            index = indexes.get(k.attribute)
            if index is None:
                index = indexes[k.attribute] = _AttributeIndex(fold=k.attribute in _CASE_INSENSITIVE)
            index.add(k, position)
    return RuleIndex(
        rules=tuple(rule for rule, _ in ordered),
        scan=tuple(scan),
        scan_positions=frozenset(scan_positions),
        by_path=indexes.get("request.path"),
        by_host=indexes.get("request.host"),
        by_method=indexes.get("request.method"),
    )

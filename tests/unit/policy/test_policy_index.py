"""The rule candidate index (authz.policy.index): keys read off Istio's matchers, candidates in order,
and the same decisions with and without it (properties over large random policies)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_helpers import decide_both, policies_from

from authz.config import MeshConfig
from authz.policy.compile import CompiledPolicies, CompiledRule, RuleSet, compile_policies
from authz.policy.evaluate import PolicyResult, evaluate
from authz.policy.index import (
    INDEX_MIN_RULES,
    IndexKey,
    MatchKind,
    RuleIndex,
    build_rule_index,
    entry_keys,
    operation_keys,
    value_key,
)
from authz.policy.matchers import RequestView, header_matcher, path_matcher, value_predicate
from authz.policy.model import Action, AuthorizationPolicy, FieldMatch, Rule
from authz.policy.reference import reference_evaluate
from authz.request import HttpAttributes, Peer, Request, Workload

PATH = "request.path"
HOST = "request.host"
METHOD = "request.method"


def fm(attribute: str, values: tuple[str, ...] = (), not_values: tuple[str, ...] = ()) -> FieldMatch:
    name = {PATH: "paths", HOST: "hosts", METHOD: "methods", "destination.port": "ports"}[attribute]
    return FieldMatch(field=name, attribute=attribute, values=values, not_values=not_values)


# -- keys --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "value", "key"),
    [
        (PATH, "/api/v1", IndexKey(PATH, "exact", "/api/v1")),
        # istio matcher/string.go: `/api/*` is the plain string prefix `/api/`, not segment based.
        (PATH, "/api/*", IndexKey(PATH, "prefix", "/api/")),
        (PATH, "/ap*", IndexKey(PATH, "prefix", "/ap")),
        (PATH, "*.json", IndexKey(PATH, "suffix", ".json")),
        (PATH, "/a*b", IndexKey(PATH, "exact", "/a*b")),  # a middle `*` is literal
        (PATH, "*", None),  # presence narrows nothing
        (PATH, "/api/{*}/items", IndexKey(PATH, "prefix", "/api/")),  # template: its literal head
        (PATH, "/api/x{**}", IndexKey(PATH, "prefix", "/api/x")),
        (PATH, "/{**}", IndexKey(PATH, "prefix", "/")),
        (PATH, "{*}/a", None),  # empty literal head
        (HOST, "Example.COM", IndexKey(HOST, "exact", "example.com")),  # hosts ignore case
        (HOST, "*.Example.com", IndexKey(HOST, "suffix", ".example.com")),
        (HOST, "API.example.com:*", IndexKey(HOST, "prefix", "api.example.com:")),
        (HOST, "*", None),
        (METHOD, "GET", IndexKey(METHOD, "exact", "GET")),
        (METHOD, "get", IndexKey(METHOD, "exact", "get")),  # methods keep their case
        (METHOD, "*", None),
        ("destination.port", "80", None),  # not an indexed attribute
        ("source.principal", "a", None),
    ],
)
def test_value_key(attribute: str, value: str, key: IndexKey | None) -> None:
    assert value_key(attribute, value) == key


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["/api/*", "/api/v1", "*.json", "/api/{*}/items", "/api/{**}", "/a*b", "/ap*", "*"]),
    st.sampled_from(["/api/", "/api/v1", "/api", "/apix.json", "/api/x/items", "/a*b", "/apx", "/", ""]),
)
def test_path_key_never_excludes_a_match(value: str, path: str) -> None:
    key = value_key(PATH, value)
    if key is None or not path_matcher(value)(path):
        return
    holds = {
        "exact": path == key.text,
        "prefix": path.startswith(key.text),
        "suffix": path.endswith(key.text),
    }
    assert holds[key.kind]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["a.com", "A.com", "*.COM", "a.*", "B.org:*", "*"]),
    st.sampled_from(["a.com", "A.COM", "x.com", "a.org", "b.ORG:80", ""]),
)
def test_host_key_never_excludes_a_match(value: str, host: str) -> None:
    key = value_key(HOST, value)
    if key is None or not header_matcher(value, ignore_case=True)(host or None):
        return
    low = host.lower()
    holds = {"exact": low == key.text, "prefix": low.startswith(key.text), "suffix": low.endswith(key.text)}
    assert holds[key.kind]


def test_entry_and_operation_keys() -> None:
    assert operation_keys(None) is None  # `to` absent: any operation
    assert operation_keys(()) is None
    # notPaths only narrows nothing; a field with one unindexable value is unindexable as a whole.
    assert entry_keys((fm(PATH, not_values=("/a",)),)) == {}
    assert entry_keys((fm(PATH, ("/a", "*")),)) == {}
    assert entry_keys((fm(PATH, ("/a", "/b/*"), ("/b/x",)), fm(METHOD, ("GET",)))) == {
        PATH: (IndexKey(PATH, "exact", "/a"), IndexKey(PATH, "prefix", "/b/")),
        METHOD: (IndexKey(METHOD, "exact", "GET"),),
    }
    # Every entry (an OR) must be indexable, else the rule is scanned.
    ops = ((fm(PATH, ("/a",)),), (fm("destination.port", ("80",)),))
    assert operation_keys(ops) is None
    ops = ((fm(PATH, ("/a",)),), (fm(HOST, ("x.com",)),))
    assert operation_keys(ops) == (
        {PATH: (IndexKey(PATH, "exact", "/a"),)},
        {HOST: (IndexKey(HOST, "exact", "x.com"),)},
    )


# -- the index itself, with strings standing in for rules --------------------------------------------


def _keys(*entries: dict[str, tuple[IndexKey, ...]]) -> tuple[dict[str, tuple[IndexKey, ...]], ...]:
    return entries


def P(kind: MatchKind, text: str) -> IndexKey:
    return IndexKey(PATH, kind, text)


def test_candidates_keep_order_merge_scan_and_dedupe() -> None:
    index = build_rule_index(
        [
            ("r0", _keys({PATH: (P("prefix", "/a/"),)})),
            ("r1", None),  # scanned
            ("r2", _keys({PATH: (P("exact", "/a/b"), P("prefix", "/a/"))})),  # two keys, one rule
            ("r3", _keys({PATH: (P("prefix", "/b/"),)}, {HOST: (IndexKey(HOST, "exact", "h.com"),)})),
            ("r4", _keys({PATH: (P("suffix", ".json"),)})),
            ("r5", _keys({PATH: (P("prefix", "/a/b"),)})),
            ("r6", _keys({METHOD: (IndexKey(METHOD, "exact", "GET"),)})),
            ("r7", _keys({PATH: (P("exact", "/z"),)})),
        ],
        min_rules=1,
    )
    assert list(index.candidates("/a/b", "GET", None)) == ["r0", "r1", "r2", "r5", "r6"]
    assert list(index.candidates("/a/b.json", "POST", "H.COM")) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert list(index.candidates("/b/x", "PUT", None)) == ["r1", "r3"]
    assert list(index.candidates("/nothing", "PUT", "x.com")) == ["r1"]
    # Prefixes are plain string prefixes: `/a/` does not cover `/a`.
    assert list(index.candidates("/a", "PUT", None)) == ["r1"]
    # TCP: nothing indexed can match (every indexed attribute is HTTP-only).
    assert list(index.candidates(None, None, None)) == ["r1"]


def test_small_rule_sets_are_scanned_whole() -> None:
    rules = [(f"r{i}", _keys({PATH: (P("exact", f"/p{i}"),)})) for i in range(INDEX_MIN_RULES - 1)]
    small = build_rule_index(rules)
    assert not small.indexed and list(small.candidates("/p0", "GET", None)) == [r for r, _ in rules]
    big = build_rule_index([*rules, ("last", _keys({PATH: (P("exact", "/last"),)}))])
    assert big.indexed and list(big.candidates("/p0", "GET", None)) == ["r0"]


def _rule_index(
    compiled: CompiledPolicies, ns: str, action: Action, tcp: bool = False
) -> RuleIndex[CompiledRule]:
    (group,) = compiled.groups_by_namespace[ns][0]
    rs = group.rules(action, False, tcp)
    assert isinstance(rs, RuleSet) and rs.index is not None
    return rs.index


def _policy(rules: str, name: str = "p", action: str = "ALLOW", ns: str = "foo") -> str:
    return (
        f"---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  action: {action}\n  rules:\n{rules}"
    )


def test_each_entry_is_indexed_by_its_most_selective_field() -> None:
    # Every rule says GET; the paths differ: the method index would hold every rule, so none is kept.
    rules = "".join(f"  - to: [{{operation: {{methods: [GET], paths: ['/r{i}/*']}}}}]\n" for i in range(20))
    index = _rule_index(compile_policies(policies_from(_policy(rules))), "foo", Action.ALLOW)
    assert index.by_path is not None and index.by_method is None and index.by_host is None
    # Same path everywhere, distinct hosts: hosts are indexed.
    rules = "".join(f"  - to: [{{operation: {{hosts: [h{i}.com], paths: ['/api/*']}}}}]\n" for i in range(20))
    index = _rule_index(compile_policies(policies_from(_policy(rules))), "foo", Action.ALLOW)
    assert index.by_host is not None and index.by_path is None
    assert [r.rule_id for r in index.candidates("/api/x", "GET", "H7.com")] == ["ns[foo]-policy[p]-rule[7]"]


# -- through compile and evaluate --------------------------------------------------------------------


def _many_prefix_rules(n: int) -> str:
    return "".join(
        f"  - from: [{{source: {{namespaces: [ns{i}]}}}}]\n"
        f"    to: [{{operation: {{methods: [GET], paths: ['/api/r{i}/*']}}}}]\n"
        for i in range(n)
    )


def _request(path: str, ns: str, method: str = "GET", tcp: bool = False) -> dict[str, object]:
    req: dict[str, object] = {
        "method": method,
        "path": path,
        "source": {"principal": f"spiffe://cluster.local/ns/{ns}/sa/s"},
        "workload": {"namespace": "foo"},
    }
    if tcp:
        req = {"tcp": True, "source": req["source"], "workload": req["workload"], "port": 80}
    return req


def test_only_candidate_rules_are_evaluated() -> None:
    pols = policies_from(_policy(_many_prefix_rules(200)))
    r = decide_both(pols, _request("/api/r123/items", "ns123"))
    assert (r.allowed, r.policy_id) == (True, "ns[foo]-policy[p]-rule[123]")
    assert [t.policy_id for t in r.trace] == ["ns[foo]-policy[p]-rule[123]"]
    # `/api/r12/*` is not a prefix of `/api/r123/...`: only rule 123 is tried, and it fails on `from`.
    r = decide_both(pols, _request("/api/r123/items", "ns12"))
    assert (r.allowed, r.reason) == (False, "no_allow_match")
    assert [(t.policy_id, t.clause) for t in r.trace] == [
        ("ns[foo]-policy[p]-rule[123]", "from[0].source.namespaces")
    ]
    # Nothing indexed under the path: no rule evaluated at all.
    r = decide_both(pols, _request("/other", "ns1"))
    assert (r.allowed, r.trace) == (False, ())


def test_or_entries_are_indexed_under_each_alternative_and_scan_rules_merge_in_order() -> None:
    rules = _many_prefix_rules(20) + (
        "  - to: [{operation: {paths: ['/alt/*']}}, {operation: {hosts: ['*.example.com']}}]\n"  # rule 20
        "  - to: [{operation: {notPaths: ['/secret']}}]\n"  # rule 21: scanned
        "  - from: [{source: {namespaces: [ns5]}}]\n"  # rule 22: no `to`, scanned
    )
    pols = policies_from(_policy(rules, action="DENY"))
    ids = [t.policy_id for t in decide_both(pols, _request("/alt/x", "zz")).trace]
    assert ids == ["ns[foo]-policy[p]-rule[20]"]  # DENY reports the first match in Envoy's order
    r = decide_both(pols, {**_request("/secret", "ns5"), "host": "API.example.com"})
    assert r.policy_id == "ns[foo]-policy[p]-rule[20]"
    assert [t.policy_id for t in r.trace] == ["ns[foo]-policy[p]-rule[20]"]
    r = decide_both(pols, _request("/secret", "ns5"))
    assert r.policy_id == "ns[foo]-policy[p]-rule[22]"
    assert [t.policy_id for t in r.trace] == ["ns[foo]-policy[p]-rule[21]", "ns[foo]-policy[p]-rule[22]"]
    # rule[5] sorts after rule[22] in Envoy's (string) order.
    r = decide_both(pols, _request("/api/r5/x", "ns5"))
    assert [t.policy_id for t in r.trace] == ["ns[foo]-policy[p]-rule[21]"]
    assert r.policy_id == "ns[foo]-policy[p]-rule[21]"


def test_tcp_requests_use_the_unindexed_tcp_variant() -> None:
    # DENY on TCP: HTTP-only fields are removed, so `to` entries of paths only match anything.
    pols = policies_from(_policy(_many_prefix_rules(20), action="DENY"))
    r = decide_both(pols, _request("", "ns3", tcp=True))
    assert r.policy_id == "ns[foo]-policy[p]-rule[3]"
    # ALLOW on TCP: rules with HTTP-only fields are dropped.
    pols = policies_from(_policy(_many_prefix_rules(20)))
    r = decide_both(pols, _request("", "ns3", tcp=True))
    assert (r.allowed, r.trace) == (False, ())


NO_INDEX = 10**9  # compile_policies(index_min_rules=NO_INDEX): every rule set scanned whole


def test_matched_rule_is_the_same_without_the_index() -> None:
    pols = policies_from(
        _policy(_many_prefix_rules(50)) + _policy(_many_prefix_rules(50), name="d", action="DENY")
    )
    req = Request(
        source=Peer(principal="spiffe://cluster.local/ns/ns42/sa/s"),
        http=HttpAttributes(method="GET", path="/api/r42/x"),
    )
    wl = Workload(namespace="foo")
    plain = evaluate(compile_policies(pols, index_min_rules=NO_INDEX), req, wl, None, path="/api/r42/x")
    assert not _rule_index(compile_policies(pols, index_min_rules=NO_INDEX), "foo", Action.DENY).indexed
    assert _rule_index(compile_policies(pols), "foo", Action.DENY).indexed
    fast = evaluate(compile_policies(pols), req, wl, None, path="/api/r42/x")
    assert (
        (fast.allowed, fast.policy_id)
        == (plain.allowed, plain.policy_id)
        == (False, "ns[foo]-policy[d]-rule[42]")
    )
    # Envoy order is string order: rule[0], rule[1], rule[10..19], rule[2], ... rule[42] is the 37th.
    assert len(plain.trace) == 37 and [t.policy_id for t in fast.trace] == ["ns[foo]-policy[d]-rule[42]"]


# -- properties: large random policies exercising every kind of key ----------------------------------

MESH = MeshConfig(trust_domain="td")
PATHS = ["/api/*", "/api/v1/*", "/api/v1/users", "/api", "/ap*", "*.json", "/api/{*}/items", "/api/{**}"]
PATHS += ["/{*}", "*", "/x/y", "/a*b", "/api/v1/users*", "*users"]
HOSTS = ["a.com", "A.com", "*.com", "*.COM", "a.*", "*", "b.org:8080", "B.ORG:*"]
METHODS = ["GET", "POST", "G*", "*T", "*", "get"]
VOCAB = {PATH: PATHS, HOST: HOSTS, METHOD: METHODS, "destination.port": ["80", "8080"]}


@st.composite
def operation(draw: st.DrawFn) -> tuple[FieldMatch, ...]:
    attrs = draw(st.lists(st.sampled_from(list(VOCAB)), min_size=1, max_size=3, unique=True))
    out = []
    for a in attrs:
        values = tuple(draw(st.lists(st.sampled_from(VOCAB[a]), max_size=2, unique=True)))
        not_values = tuple(draw(st.lists(st.sampled_from(VOCAB[a]), max_size=1)))
        out.append(fm(a, values if values or not_values else (VOCAB[a][0],), not_values))
    return tuple(out)


@st.composite
def rule(draw: st.DrawFn) -> Rule:
    ops = None if draw(st.integers(0, 5)) == 0 else tuple(draw(st.lists(operation(), min_size=1, max_size=2)))
    ns = draw(st.sampled_from([None, "foo", "b*"]))
    sources = None if ns is None else ((FieldMatch("namespaces", "source.namespace", (ns,)),),)
    return Rule(sources=sources, operations=ops)


@st.composite
def policy_set(draw: st.DrawFn) -> list[AuthorizationPolicy]:
    out = []
    for i in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from([Action.ALLOW, Action.DENY, Action.AUDIT]))
        rules = tuple(draw(st.lists(rule(), min_size=INDEX_MIN_RULES, max_size=INDEX_MIN_RULES + 6)))
        out.append(
            AuthorizationPolicy(
                name=f"p{i}",
                namespace="foo",
                action=action,
                rules=rules,
                dry_run=draw(st.integers(0, 6)) == 0,
            )
        )
    return out


@st.composite
def request(draw: st.DrawFn) -> tuple[Request, str]:
    path = draw(
        st.sampled_from(
            ["/api", "/api/", "/api/v1/users", "/api/v1/users.json", "/api/x/items", "/apix", "/x/y"]
        )
        | st.sampled_from(["/a*b", "/axb", "/", "/API/v1/users", "/api/v1/"])
    )
    http = None
    if draw(st.integers(0, 5)) > 0:
        http = HttpAttributes(
            method=draw(st.sampled_from(["GET", "POST", "PUT", "get", "DELETE"])),
            host=draw(st.sampled_from(["a.com", "A.COM", "b.org:8080", "B.Org:9", "x.CoM", "", "a.org"])),
            path=path,
        )
    principal = draw(st.sampled_from(["", "spiffe://td/ns/foo/sa/a", "spiffe://td/ns/bar/sa/a"]))
    req = Request(
        source=Peer(address="10.0.0.1", principal=principal),
        destination=Peer(address="10.9.9.9", port=draw(st.sampled_from([80, 8080]))),
        http=http,
    )
    return req, ("" if http is None else path)


def _key(res: PolicyResult) -> tuple[object, ...]:
    return (res.allowed, res.reason, res.policy_id, res.audit, res.audit_policy_id, res.shadow)


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORKLOAD = Workload(namespace="foo")


@PROPERTY
@given(policy_set(), request())
def test_index_only_skips_rules_that_cannot_match(
    pols: list[AuthorizationPolicy], r: tuple[Request, str]
) -> None:
    """compiled (indexed) == reference == compiled without the index, and the indexed trace is the full
    trace less some rules, none of which matched."""
    req, path = r
    fast = evaluate(compile_policies(pols, MESH), req, WORKLOAD, None, path=path)
    ref = reference_evaluate(pols, MESH, req, WORKLOAD, None, path=path)
    full = evaluate(compile_policies(pols, MESH, index_min_rules=NO_INDEX), req, WORKLOAD, None, path=path)
    assert _key(fast) == _key(ref) == _key(full)
    fast_entries = list(fast.trace)
    for entry in full.trace:
        if fast_entries and fast_entries[0] == entry:
            fast_entries.pop(0)
        else:
            assert not entry.matched, entry
    assert fast_entries == []


def _field_matches(f: FieldMatch, view: RequestView) -> bool:
    def any_value(values: tuple[str, ...]) -> bool:
        return any(p(view) for v in values for p in value_predicate(f, v, policy_namespace="foo", mesh=MESH))

    return (not f.values or any_value(f.values)) and not (f.not_values and any_value(f.not_values))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.none() | st.lists(operation(), min_size=1, max_size=2), min_size=1, max_size=20), request()
)
def test_every_rule_whose_to_can_match_is_a_candidate(
    rules: list[list[tuple[FieldMatch, ...]] | None], r: tuple[Request, str]
) -> None:
    """Soundness of the index alone: a rule whose ``to`` matches the request (by the matchers the
    evaluator uses) is always a candidate; candidates come once each, in order."""
    req, path = r
    keyed = [(i, operation_keys(ops)) for i, ops in enumerate(rules)]
    index = build_rule_index(keyed, min_rules=1)
    http = req.http
    if http is None:
        got = list(index.candidates(None, None, None))
    else:
        got = list(index.candidates(path, http.method, http.host or None))
    assert got == sorted(set(got))
    view = RequestView(req, None, path)
    for i, ops in enumerate(rules):
        if keyed[i][1] is None:
            assert i in got  # scanned
        elif ops is not None and any(all(_field_matches(f, view) for f in entry) for entry in ops):
            assert i in got, (ops, path, http)

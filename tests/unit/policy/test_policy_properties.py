"""Hypothesis properties over random policies and requests (small vocabularies so values collide)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.config import MeshConfig
from authz.policy.compile import compile_policies
from authz.policy.evaluate import PolicyResult, evaluate
from authz.policy.model import Action, AuthorizationPolicy, FieldMatch, Rule
from authz.policy.reference import reference_evaluate
from authz.request import HttpAttributes, Peer, Request, RequestAuth, Workload

MESH = MeshConfig(trust_domain="td", trust_domain_aliases=("old",))
NAMESPACES = ["foo", "bar", "istio-system"]

# attribute -> (field name or when key, value vocabulary)
VOCAB: dict[str, tuple[str, list[str]]] = {
    "source.principal": ("principals", ["cluster.local/ns/foo/sa/a", "td/ns/bar/*", "*/sa/a", "*"]),
    "source.namespace": ("namespaces", ["foo", "b*", "*"]),
    "source.ip": ("ipBlocks", ["10.0.0.0/8", "10.0.0.1", "192.168.0.0/16"]),
    "remote.ip": ("remoteIpBlocks", ["10.0.0.0/8", "::1"]),
    "destination.ip": ("destination.ip", ["10.9.9.9", "192.168.0.0/16"]),
    "request.auth.principal": ("requestPrincipals", ["iss/alice", "*", "iss/*", "*/bob"]),
    "request.host": ("hosts", ["a.com", "*.com", "A.COM:*", "*"]),
    "request.method": ("methods", ["GET", "POST", "*"]),
    "request.path": ("paths", ["/a", "/a/*", "/b", "/a/{*}", "*"]),
    "destination.port": ("ports", ["80", "8080"]),
    "request.headers": ("request.headers[x-k]", ["v", "v*", "*"]),
    "request.auth.claims": ("request.auth.claims[groups]", ["admin", "dev*"]),
    "connection.sni": ("connection.sni", ["*.svc", "x.svc"]),
}
SOURCE_ATTRS = ["source.principal", "source.namespace", "source.ip", "remote.ip", "request.auth.principal"]
OP_ATTRS = ["request.host", "request.method", "request.path", "destination.port"]
WHEN_ATTRS = [
    "request.headers",
    "request.auth.claims",
    "connection.sni",
    "source.ip",
    "remote.ip",
    "destination.ip",
    "destination.port",
]


@st.composite
def field_match(draw: st.DrawFn, attribute: str, condition: bool) -> FieldMatch:
    name, vocab = VOCAB[attribute]
    values = tuple(draw(st.lists(st.sampled_from(vocab), max_size=2, unique=True)))
    not_values = tuple(draw(st.lists(st.sampled_from(vocab), max_size=1)))
    if not values and not not_values:
        values = (vocab[0],)
    key: tuple[str, ...] = ()
    if attribute == "request.headers":
        key = ("x-k",)
    elif attribute == "request.auth.claims":
        key = ("groups",)
    field = name
    if condition and attribute in ("source.ip", "remote.ip", "destination.ip", "destination.port"):
        field = attribute
    return FieldMatch(field=field, attribute=attribute, values=values, not_values=not_values, key=key)


@st.composite
def entries(draw: st.DrawFn, attrs: list[str]) -> tuple[tuple[FieldMatch, ...], ...] | None:
    if draw(st.booleans()):
        return None
    out = []
    for _ in range(draw(st.integers(1, 2))):
        chosen = draw(st.lists(st.sampled_from(attrs), min_size=1, max_size=2, unique=True))
        out.append(tuple(draw(field_match(a, False)) for a in chosen))
    return tuple(out)


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    when_attrs = draw(st.lists(st.sampled_from(WHEN_ATTRS), max_size=2, unique=True))
    return Rule(
        sources=draw(entries(SOURCE_ATTRS)),
        operations=draw(entries(OP_ATTRS)),
        conditions=tuple(draw(field_match(a, True)) for a in when_attrs),
    )


@st.composite
def policies(draw: st.DrawFn, name: str, action: Action | None = None) -> AuthorizationPolicy:
    act = action or draw(st.sampled_from([Action.ALLOW, Action.DENY, Action.AUDIT, Action.ALLOW]))
    rule_list = draw(st.lists(rules(), max_size=3))
    has_rules = act in (Action.DENY,) or draw(st.integers(0, 5)) > 0
    selector = draw(st.sampled_from([None, {"app": "a"}, {"app": "b"}, {"app": "a", "v": "1"}]))
    dry = act in (Action.ALLOW, Action.DENY) and draw(st.integers(0, 5)) == 0
    return AuthorizationPolicy(
        name=name,
        namespace=draw(st.sampled_from(NAMESPACES)),
        action=act,
        rules=tuple(rule_list) if has_rules else None,
        selector=selector,
        dry_run=dry,
    )


@st.composite
def policy_sets(draw: st.DrawFn) -> list[AuthorizationPolicy]:
    n = draw(st.integers(0, 4))
    return [draw(policies(f"p{i}")) for i in range(n)]


PRINCIPALS = [
    "",
    "spiffe://td/ns/foo/sa/a",
    "spiffe://old/ns/foo/sa/a",
    "spiffe://td/ns/bar/sa/z",
    "spiffe://x/ns/baz/sa/a",
]
ADDRESSES = ["10.0.0.1", "192.168.1.1", "::1", ""]
AUTHS = [
    None,
    RequestAuth({"iss": "iss", "sub": "alice", "groups": ["admin"]}),
    RequestAuth({"iss": "other", "sub": "bob", "groups": "developer"}),
]


@st.composite
def requests(draw: st.DrawFn) -> tuple[Request, Workload, RequestAuth | None, str]:
    tcp = draw(st.integers(0, 4)) == 0
    path = draw(st.sampled_from(["/a", "/a/x", "/b", "/c", "/a/x/y"]))
    http = None
    if not tcp:
        http = HttpAttributes(
            method=draw(st.sampled_from(["GET", "POST", "PUT"])),
            host=draw(st.sampled_from(["a.com", "A.com:80", "b.org", ""])),
            path=path,
            headers=draw(st.sampled_from([{}, {"x-k": "v"}, {"x-k": "vv"}, {"x-k": ""}])),
        )
    principal = draw(st.sampled_from(PRINCIPALS))
    req = Request(
        source=Peer(address=draw(st.sampled_from(ADDRESSES)), principal=principal),
        destination=Peer(address="10.9.9.9", port=draw(st.sampled_from([80, 8080, 9090]))),
        http=http,
        sni=draw(st.sampled_from(["", "x.svc", "y.svc"])),
    )
    auth = draw(st.sampled_from(AUTHS))
    wl = Workload(
        namespace=draw(st.sampled_from(["foo", "bar"])),
        labels=draw(st.sampled_from([{}, {"app": "a"}, {"app": "a", "v": "1"}])),
    )
    return req, wl, auth, ("" if tcp else path)


def decide(
    pols: list[AuthorizationPolicy], r: tuple[Request, Workload, RequestAuth | None, str]
) -> PolicyResult:
    req, wl, auth, path = r
    return evaluate(compile_policies(pols, MESH), req, wl, auth, path=path)


def key(res: PolicyResult) -> tuple[object, ...]:
    return (res.allowed, res.reason, res.policy_id, res.audit, res.audit_policy_id, res.shadow)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(policy_sets(), requests())
def test_compiled_equals_reference(
    pols: list[AuthorizationPolicy], r: tuple[Request, Workload, RequestAuth | None, str]
) -> None:
    req, wl, auth, path = r
    ref = reference_evaluate(pols, MESH, req, wl, auth, path=path)
    assert key(decide(pols, r)) == key(ref)


@SETTINGS
@given(policy_sets(), st.data(), requests())
def test_adding_deny_never_allows_more(
    pols: list[AuthorizationPolicy], data: st.DataObject, r: tuple[Request, Workload, RequestAuth | None, str]
) -> None:
    before = decide(pols, r)
    extra = data.draw(policies("zz-deny", Action.DENY))
    after = decide([*pols, extra], r)
    if not before.allowed:
        assert not after.allowed


@SETTINGS
@given(policy_sets(), st.data(), requests())
def test_adding_allow_never_allows_when_allow_policies_existed(
    pols: list[AuthorizationPolicy], data: st.DataObject, r: tuple[Request, Workload, RequestAuth | None, str]
) -> None:
    before = decide(pols, r)
    extra = data.draw(policies("zz-allow", Action.ALLOW))
    after = decide([*pols, extra], r)
    if not before.allowed and before.reason == "denied_by_policy":
        assert not after.allowed
    if not before.allowed and before.reason == "no_allow_match" and after.allowed:
        # Only the new policy can be the one that allowed.
        assert after.policy_id.startswith(extra.policy_name)


@SETTINGS
@given(policy_sets(), st.randoms(use_true_random=False), requests())
def test_policy_order_never_changes_the_decision(
    pols: list[AuthorizationPolicy], rnd: object, r: tuple[Request, Workload, RequestAuth | None, str]
) -> None:
    shuffled = list(pols)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert key(decide(pols, r)) == key(decide(shuffled, r))


@st.composite
def request_variants(draw: st.DrawFn) -> list[tuple[Request, Workload, RequestAuth | None, str]]:
    """A request and copies of it that differ in one attribute each (same path, method, host and token
    unless that is the attribute changed): exactly what a memo key must tell apart."""
    base = draw(requests())
    req, wl, auth, path = base
    out = [base]
    for _ in range(draw(st.integers(1, 6))):
        change = draw(st.sampled_from(["principal", "ip", "remote", "port", "sni", "header", "auth", "dst"]))
        r = req
        if change == "principal":
            r = replace(req, source=replace(req.source, principal=draw(st.sampled_from(PRINCIPALS))))
        elif change == "ip":
            r = replace(req, source=replace(req.source, address=draw(st.sampled_from(ADDRESSES))))
        elif change == "remote":
            r = replace(req, remote_ip=draw(st.sampled_from(ADDRESSES)))
        elif change == "dst":
            r = replace(req, destination=replace(req.destination, address=draw(st.sampled_from(ADDRESSES))))
        elif change == "port":
            r = replace(
                req, destination=replace(req.destination, port=draw(st.sampled_from([80, 8080, 9090])))
            )
        elif change == "sni":
            r = replace(req, sni=draw(st.sampled_from(["", "x.svc", "y.svc"])))
        elif change == "header" and req.http is not None:
            headers = draw(st.sampled_from([{}, {"x-k": "v"}, {"x-k": "vv"}, {"x-k": ""}]))
            r = replace(req, http=replace(req.http, headers=headers))
        out.append((r, wl, draw(st.sampled_from(AUTHS)) if change == "auth" else auth, path))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_sets(), request_variants())
def test_remembered_outcomes_equal_the_reference_across_many_requests(
    pols: list[AuthorizationPolicy], many: list[tuple[Request, Workload, RequestAuth | None, str]]
) -> None:
    """One compiled set answers requests that differ in one attribute each, twice over: every answer,
    remembered or computed, equals the reference evaluator's. A memo key missing an attribute a rule
    reads would answer a later request with an earlier one's outcome."""
    compiled = compile_policies(pols, MESH)
    for req, wl, auth, path in [*many, *many]:
        got = evaluate(compiled, req, wl, auth, path=path)
        ref = reference_evaluate(pols, MESH, req, wl, auth, path=path)
        assert key(got) == key(ref)
        assert got.normalized_path == path


_BASE = Request(
    source=Peer(address="10.0.0.1", principal="spiffe://td/ns/foo/sa/a"),
    destination=Peer(address="10.9.9.9", port=80),
    http=HttpAttributes(method="GET", host="a.com", path="/a", headers={"x-k": "v"}),
    sni="x.svc",
)
_SRC, _DST, _HTTP = _BASE.source, _BASE.destination, _BASE.http
assert _HTTP is not None
_OTHER_SOURCE = replace(_SRC, principal="spiffe://td/ns/bar/sa/a")
_OTHER_HEADER = replace(_HTTP, headers={"x-k": "w"})
_OTHER_DST_IP = replace(_DST, address="10.9.9.8")
# attribute, field (or condition key), allowed value, a request that differs from _BASE only there
_ONE_ATTRIBUTE_CASES: list[tuple[str, str, str, Request]] = [
    ("source.principal", "principals", "td/ns/foo/sa/a", replace(_BASE, source=_OTHER_SOURCE)),
    ("source.namespace", "namespaces", "foo", replace(_BASE, source=_OTHER_SOURCE)),
    ("source.ip", "ipBlocks", "10.0.0.0/8", replace(_BASE, source=replace(_SRC, address="192.168.1.1"))),
    ("remote.ip", "remoteIpBlocks", "10.0.0.0/8", replace(_BASE, remote_ip="192.168.1.1")),
    ("destination.ip", "destination.ip", "10.9.9.9", replace(_BASE, destination=_OTHER_DST_IP)),
    ("destination.port", "ports", "80", replace(_BASE, destination=replace(_DST, port=8080))),
    ("connection.sni", "connection.sni", "x.svc", replace(_BASE, sni="y.svc")),
    ("request.headers", "request.headers[x-k]", "v", replace(_BASE, http=_OTHER_HEADER)),
    ("request.headers", "request.headers[:path]", "/a", replace(_BASE, http=replace(_HTTP, path="/a?q"))),
]  # fmt: skip


@pytest.mark.parametrize(("attribute", "field", "value", "other"), _ONE_ATTRIBUTE_CASES)
def test_remembered_outcomes_tell_apart_requests_that_differ_in_one_attribute(
    attribute: str, field: str, value: str, other: Request
) -> None:
    """For each attribute a rule can read: after the matching request's outcome is remembered, a request
    that differs only in that attribute is decided afresh (denied), in either order."""
    key_: tuple[str, ...] = ()
    if field.startswith("request.headers["):
        key_ = (field[len("request.headers[") : -1],)
    match = FieldMatch(field=field, attribute=attribute, values=(value,), key=key_)
    condition = attribute in ("destination.ip", "connection.sni", "request.headers")
    rule = Rule(
        sources=None if condition or attribute == "destination.port" else ((match,),),
        operations=((match,),) if attribute == "destination.port" else None,
        conditions=(match,) if condition else (),
    )
    policy = AuthorizationPolicy(name="p", namespace="foo", action=Action.ALLOW, rules=(rule,))
    wl = Workload(namespace="foo")
    for order in ((_BASE, other), (other, _BASE)):
        compiled = compile_policies([policy], MESH)
        for _ in range(2):
            got = [evaluate(compiled, r, wl, None, path="/a").allowed for r in order]
            assert got == [r is _BASE for r in order], (attribute, got)

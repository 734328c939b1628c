"""Decision tables for the evaluator (each case names its Istio source); both evaluators must agree."""

from __future__ import annotations

from typing import Any

import pytest
from policy_helpers import decide_both, policies_from

from authz.config import MeshConfig
from authz.decision import Reason
from authz.policy.compile import compile_policies
from authz.policy.evaluate import evaluate
from authz.policy.explain import explain
from authz.request import HttpAttributes, Request, RequestAuth, Workload

SP = "spiffe://cluster.local/ns/foo/sa/sleep"


def P(body: str, name: str = "p", ns: str = "foo", action: str = "ALLOW", extra_meta: str = "") -> str:
    return (
        f"---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {ns}{extra_meta}}}\nspec:\n  action: {action}\n{body}"
    )


def R(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "method": "GET",
        "path": "/",
        "workload": {"namespace": "foo", "labels": {"app": "a"}},
    }
    base.update(kw)
    return base


def test_no_policy_allows() -> None:
    r = decide_both([], R())
    assert (r.allowed, r.reason, r.policy_id) == (True, Reason.ALLOWED_NO_POLICY, "")


def test_allow_nothing_denies_everything() -> None:
    # istio api header example "allow-nothing"; builder testdata allow-nil-rule.
    r = decide_both(policies_from(P("")), R())
    assert (r.allowed, r.reason, r.policy_id) == (False, Reason.NO_ALLOW_MATCH, "none")


def test_allow_all_and_deny_all() -> None:
    # istio builder testdata allow-empty-rule / deny-empty-rule: rules: [{}] always matches.
    r = decide_both(policies_from(P("  rules: [{}]\n")), R())
    assert (r.allowed, r.policy_id) == (True, "ns[foo]-policy[p]-rule[0]")
    r = decide_both(policies_from(P("  rules: [{}]\n") + P("  rules: [{}]\n", name="d", action="DENY")), R())
    assert (r.allowed, r.reason, r.policy_id) == (False, Reason.DENIED_BY_POLICY, "ns[foo]-policy[d]-rule[0]")


def test_selector_and_root_namespace() -> None:
    text = P("  selector: {matchLabels: {app: b}}\n") + P(
        "  rules: [{}]\n", name="mesh", ns="istio-system", action="DENY"
    )
    r = decide_both(policies_from(text), R())
    assert (r.allowed, r.policy_id) == (False, "ns[istio-system]-policy[mesh]-rule[0]")
    # A policy in another namespace does not apply.
    r = decide_both(policies_from(P("", ns="bar")), R())
    assert r.allowed
    # The selector does not select app=a: the allow-nothing policy does not apply.
    r = decide_both(policies_from(P("  selector: {matchLabels: {app: b}}\n")), R())
    assert r.allowed
    # A custom root namespace.
    mesh = MeshConfig(root_namespace="mesh-root")
    r = decide_both(policies_from(P("", ns="mesh-root")), R(), mesh)
    assert not r.allowed


def test_not_method() -> None:
    # istio authz_test.go TestAuthz_NotMethod: notMethods [PUT] in ALLOW allows GET, denies PUT.
    pols = policies_from(P("  rules:\n  - to:\n    - operation: {notMethods: [PUT]}\n"))
    assert decide_both(pols, R(method="GET")).allowed
    assert not decide_both(pols, R(method="PUT")).allowed


def test_not_port() -> None:
    # istio TestAuthz_NotPort: http port allowed, the http2 port denied.
    pols = policies_from(P("  rules:\n  - to:\n    - operation: {notPorts: ['8090']}\n"))
    assert decide_both(pols, R(destination={"port": 8080})).allowed
    assert not decide_both(pols, R(destination={"port": 8090})).allowed


def test_paths_with_query_and_precedence() -> None:
    # istio TestAuthz_PathPrecedence / TestAuthz_Principal: query is stripped; DENY wins over ALLOW.
    text = P("  rules:\n  - to:\n    - operation: {paths: ['/allow*']}\n") + P(
        "  rules:\n  - to:\n    - operation: {paths: ['/allow/admin']}\n", name="d", action="DENY"
    )
    pols = policies_from(text)
    assert decide_both(pols, R(path="/allow?param=value")).allowed
    assert not decide_both(pols, R(path="/allow/admin")).allowed
    assert not decide_both(pols, R(path="/allow/%2e%2e/allow/admin")).allowed  # normalized first
    assert not decide_both(pols, R(path="/other")).allowed


def test_path_templating() -> None:
    # istio authz_test.go TestAuthz_PathTemplating.
    pols = policies_from(
        P(
            "  rules:\n  - to:\n    - operation:\n        paths: ['/allow/admin/{**}', '/foo/{*}/bar/{**}', '/store/{**}/cart']\n"  # noqa: E501
        )
    )
    for path in ["/allow/admin/", "/allow/admin/temp.txt", "/foo/buzz/bar/bat", "/store/foo/cart"]:
        assert decide_both(pols, R(path=path)).allowed, path
    for path in ["/allow/admin", "/allow/admin?param=value", "/foo/bar/bat.txt", "/store/cart"]:
        assert not decide_both(pols, R(path=path)).allowed, path
    # "/store//cart" only keeps its double slash without MERGE_SLASHES (BASE is the default).
    assert decide_both(pols, R(path="/store//cart")).allowed


def test_hosts() -> None:
    # istio TestAuthz_IngressGateway / TestAuthz_NotHost.
    pols = policies_from(
        P("  rules:\n  - to:\n    - operation: {hosts: ['deny.example.com']}\n", action="DENY")
    )
    for host in ["deny.example.com", "DENY.EXAMPLE.COM", "Deny.Example.Com"]:
        assert not decide_both(pols, R(host=host)).allowed
    assert decide_both(pols, R(host="deny.example.com:80")).allowed
    pols = policies_from(P("  rules:\n  - to:\n    - operation: {notHosts: ['x.com']}\n"))
    assert decide_both(pols, R(host="y.com")).allowed
    assert not decide_both(pols, R(host="X.COM")).allowed


def test_missing_attributes() -> None:
    # spec §1.5: positive false, negative true. istio plaintext.yaml.tmpl: DENY notPrincipals ["*"].
    pols = policies_from(P("  rules:\n  - from:\n    - source: {notPrincipals: ['*']}\n", action="DENY"))
    assert not decide_both(pols, R()).allowed
    assert decide_both(pols, R(source={"principal": SP})).allowed
    # notRequestPrincipals in ALLOW admits requests without a JWT (jwt.yaml.tmpl /token3).
    pols = policies_from(P("  rules:\n  - from:\n    - source: {notRequestPrincipals: ['*']}\n"))
    assert decide_both(pols, R()).allowed
    assert not decide_both(pols, R(claims={"iss": "i", "sub": "s"})).allowed
    # request.headers notValues matches when the header is absent.
    pols = policies_from(
        P("  rules:\n  - when:\n    - key: request.headers[x-a]\n      notValues: ['bad']\n")
    )
    assert decide_both(pols, R()).allowed
    assert not decide_both(pols, R(headers={"X-A": "bad"})).allowed


def test_header_values_and_not_values() -> None:
    # istio tests/integration/ambient/baseline_test.go TestAuthorizationL7.
    pols = policies_from(
        P(
            "  rules:\n  - when:\n    - key: request.headers[x-test-header]\n      values: [match]\n      notValues: [do-not-match]\n"  # noqa: E501
        )
    )
    assert decide_both(pols, R(headers={"x-test-header": "match"})).allowed
    assert not decide_both(pols, R(headers={"x-test-header": "do-not-match"})).allowed
    assert not decide_both(pols, R()).allowed


def test_or_and_structure() -> None:
    # spec §1.5: OR(from) AND OR(to) AND AND(when).
    pols = policies_from(
        P(
            "  rules:\n  - from:\n    - source: {namespaces: [a]}\n    - source: {namespaces: [b]}\n"
            "    to:\n    - operation: {methods: [GET]}\n    - operation: {paths: ['/p']}\n"
            "    when:\n    - key: request.headers[x]\n      values: ['1']\n    - key: source.ip\n      values: [10.0.0.0/8]\n"  # noqa: E501
        )
    )
    good = R(
        source={"principal": "spiffe://td/ns/b/sa/s", "ip": "10.1.2.3"},
        method="POST",
        path="/p",
        headers={"x": "1"},
    )
    assert decide_both(pols, good).allowed
    for bad in (
        {**good, "source": {"principal": "spiffe://td/ns/c/sa/s", "ip": "10.1.2.3"}},
        {**good, "path": "/q"},
        {**good, "headers": {"x": "2"}},
        {**good, "source": {"principal": "spiffe://td/ns/b/sa/s", "ip": "11.1.2.3"}},
    ):
        r = decide_both(pols, bad)
        assert not r.allowed
        assert r.trace[-1].matched is False and r.trace[-1].clause


def test_trace_names_the_failing_clause() -> None:
    pols = policies_from(P("  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/x/sa/y]}\n"))
    r = decide_both(pols, R(source={"principal": SP}))
    assert [(t.stage, t.policy_id, t.matched, t.clause) for t in r.trace] == [
        ("allow", "ns[foo]-policy[p]-rule[0]", False, "from[0].source.principals")
    ]
    text = explain(r)
    assert "DENY" in text and "from[0].source.principals did not match" in text


def test_claims_and_audiences() -> None:
    # istio jwt_test.go /scope, /permission, custom_scope; PR #50843 aud list.
    pols = policies_from(
        P(
            "  rules:\n  - when:\n    - key: request.auth.claims[scope]\n      values: [write]\n"
            "    - key: request.auth.audiences\n      values: [api]\n"
            "    - key: request.auth.claims[nested][team]\n      values: ['eng*']\n"
        )
    )
    ok = {"scope": "read write", "aud": ["x", "api"], "nested": {"team": "engineering"}}
    assert decide_both(pols, R(claims=ok)).allowed
    assert not decide_both(pols, R(claims={**ok, "scope": "admin"})).allowed
    assert not decide_both(pols, R(claims={**ok, "aud": "other"})).allowed
    assert decide_both(pols, R(claims={**ok, "aud": "api"})).allowed
    assert not decide_both(pols, R(claims={**ok, "nested": {"team": 3}})).allowed
    # whole-string match no longer works for a space-delimited claim (spec §3.5 side effect).
    pols = policies_from(
        P("  rules:\n  - when:\n    - key: request.auth.claims[scope]\n      values: ['read write']\n")
    )
    assert not decide_both(pols, R(claims={"scope": "read write"})).allowed
    # Non-string claims never match (istio issue #39703).
    pols = policies_from(
        P("  rules:\n  - when:\n    - key: request.auth.claims[admin]\n      values: ['true']\n")
    )
    assert not decide_both(pols, R(claims={"admin": True})).allowed


def test_request_principals_and_presenter() -> None:
    pols = policies_from(
        P(
            "  rules:\n  - from:\n    - source: {requestPrincipals: ['https://idp.example.com/alice']}\n"
            "    when:\n    - key: request.auth.presenter\n      values: [web]\n"
        )
    )
    assert decide_both(
        pols, R(claims={"iss": "https://idp.example.com", "sub": "alice", "azp": "web"})
    ).allowed
    assert not decide_both(
        pols, R(claims={"iss": "https://idp.example.com", "sub": "bob", "azp": "web"})
    ).allowed
    assert not decide_both(pols, R()).allowed


def test_trust_domain_aliases_in_evaluation() -> None:
    # istio builder testdata simple-policy-td-aliases: cluster.local expands to td and aliases.
    pols = policies_from(
        P("  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/foo/sa/sleep]}\n")
    )
    mesh = MeshConfig(trust_domain="td1", trust_domain_aliases=("old-td",))
    assert decide_both(pols, R(source={"principal": "spiffe://td1/ns/foo/sa/sleep"}), mesh).allowed
    assert decide_both(pols, R(source={"principal": "spiffe://old-td/ns/foo/sa/sleep"}), mesh).allowed
    assert not decide_both(
        pols, R(source={"principal": "spiffe://cluster.local/ns/foo/sa/sleep"}), mesh
    ).allowed
    assert not decide_both(pols, R(source={"principal": "spiffe://other/ns/foo/sa/sleep"}), mesh).allowed


def test_ip_blocks_and_remote_ip() -> None:
    pols = policies_from(
        P("  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/8], notRemoteIpBlocks: ['203.0.113.7']}\n")
    )
    assert decide_both(pols, R(source={"ip": "10.2.3.4"}, remoteIp="198.51.100.1")).allowed
    assert not decide_both(pols, R(source={"ip": "10.2.3.4"}, remoteIp="203.0.113.7")).allowed
    assert not decide_both(pols, R(source={"ip": "192.168.1.1"})).allowed
    assert not decide_both(pols, R(source={"ip": "::ffff:10.2.3.4"})).allowed  # IPv6 vs IPv4 block
    assert not decide_both(pols, R(source={"ip": "not-an-ip"})).allowed


def test_sni_destination_ip_and_metadata() -> None:
    pols = policies_from(
        P(
            "  rules:\n  - when:\n    - key: connection.sni\n      values: ['*.orders.svc.cluster.local']\n"
            "    - key: destination.ip\n      values: [10.0.0.9]\n"
            "    - key: experimental.envoy.filters.http.foo[roles]\n      values: ['[admin]']\n"
        )
    )
    req = R(
        sni="outbound_.8080_._.orders.svc.cluster.local",
        destination={"ip": "10.0.0.9", "port": 8080},
        metadata={"envoy.filters.http.foo": {"roles": ["user", "admin"]}},
    )
    assert decide_both(pols, req).allowed
    assert not decide_both(pols, {**req, "metadata": {"envoy.filters.http.foo": {"roles": "admin"}}}).allowed


# spec §1.9; istio builder/testdata/tcp/*.yaml, model_test.go TestModel_Generate, IO authz-tcp task.
TCP_CASES = [
    # ALLOW with methods+ports: the rule is dropped on TCP, default deny remains (authz-tcp task).
    ("ALLOW", "  rules:\n  - to:\n    - operation: {methods: [GET], ports: ['9000']}\n", 9000, False),
    # allow-both-http-tcp: only the TCP-only rule survives.
    (
        "ALLOW",
        "  rules:\n  - to:\n    - operation: {methods: [GET]}\n  - from:\n    - source: {namespaces: [ns-1]}\n"  # noqa: E501
        "    to:\n    - operation: {ports: ['80']}\n",
        80,
        True,
    ),
    # deny-both-http-tcp: to [{methods: [GET]}] => deny all TCP.
    ("DENY", "  rules:\n  - to:\n    - operation: {methods: [GET]}\n", 1234, False),
    # requestPrincipals removed, ports kept: deny port 80 only.
    (
        "DENY",
        "  rules:\n  - from:\n    - source: {requestPrincipals: [id-1]}\n    to:\n    - operation: {ports: ['80']}\n",  # noqa: E501
        80,
        False,
    ),
    (
        "DENY",
        "  rules:\n  - from:\n    - source: {requestPrincipals: [id-1]}\n    to:\n    - operation: {ports: ['80']}\n",  # noqa: E501
        81,
        True,
    ),
    # when request.headers[:method] => deny all.
    ("DENY", "  rules:\n  - when:\n    - key: request.headers[:method]\n      values: [GET]\n", 5, False),
]


@pytest.mark.parametrize(("action", "body", "port", "allowed"), TCP_CASES)
def test_tcp_drop_and_widen(action: str, body: str, port: int, allowed: bool) -> None:
    pols = policies_from(P(body, action=action))
    req = {
        "tcp": True,
        "source": {"principal": "spiffe://td/ns/ns-1/sa/x"},
        "destination": {"port": port},
        "workload": {"namespace": "foo"},
    }
    assert decide_both(pols, req).allowed is allowed


def test_tcp_allow_only_http_denies_all() -> None:
    # istio builder/testdata/tcp/allow-only-http-out.yaml: the ALLOW RBAC has no policies => deny.
    pols = policies_from(P("  rules:\n  - to:\n    - operation: {paths: ['/x']}\n"))
    r = decide_both(pols, {"tcp": True, "workload": {"namespace": "foo"}})
    assert (r.allowed, r.policy_id) == (False, "none")


def test_dry_run_and_audit() -> None:
    # istio builder testdata dry-run-mix; AUDIT marks only.
    text = (
        P("  rules: [{}]\n", name="allow-all")
        + P(
            "  rules:\n  - to:\n    - operation: {paths: ['/admin']}\n",
            name="dry-deny",
            action="DENY",
            extra_meta=", annotations: {istio.io/dry-run: 'true'}",
        )
        + P("  rules:\n  - to:\n    - operation: {paths: ['/admin']}\n", name="audit", action="AUDIT")
    )
    pols = policies_from(text)
    r = decide_both(pols, R(path="/admin"))
    assert r.allowed and r.audit and r.audit_policy_id == "ns[foo]-policy[audit]-rule[0]"
    assert r.shadow is not None and (r.shadow.allowed, r.shadow.policy_id) == (
        False,
        "ns[foo]-policy[dry-deny]-rule[0]",
    )
    r = decide_both(pols, R(path="/public"))
    assert r.allowed and not r.audit and r.shadow is not None and r.shadow.allowed


def test_dry_run_allow_does_not_trigger_default_deny() -> None:
    pols = policies_from(P("", extra_meta=", annotations: {istio.io/dry-run: 'true'}"))
    r = decide_both(pols, R())
    assert r.allowed and r.reason == Reason.ALLOWED_NO_POLICY
    assert r.shadow is not None and (r.shadow.allowed, r.shadow.policy_id) == (False, "none")


def test_custom_policies_are_traced_not_evaluated() -> None:
    pols = policies_from(P("  provider: {name: ext}\n  rules: [{}]\n", action="CUSTOM"))
    r = decide_both(pols, R())
    assert r.allowed and r.reason == Reason.ALLOWED_NO_POLICY
    assert [(t.stage, t.matched) for t in r.trace] == [("custom", False)]
    assert "ext" in r.trace[0].clause


def test_target_ref_policies_do_not_apply_to_sidecars() -> None:
    pols = policies_from(P("  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n"))
    assert decide_both(pols, R()).allowed


def test_reported_policy_id_is_envoy_map_order() -> None:
    # Envoy's RBAC policies live in a std::map: the first matching id in string order is reported.
    pols = policies_from(
        P("  rules: " + "[" + ", ".join(["{}"] * 11) + "]\n", name="b") + P("  rules: [{}]\n", name="a")
    )
    assert decide_both(pols, R()).policy_id == "ns[foo]-policy[a]-rule[0]"
    pols = policies_from(P("  rules: [{to: [{operation: {paths: [/x]}}]}" + ", {}" * 10 + "]\n", name="b"))
    assert decide_both(pols, R()).policy_id == "ns[foo]-policy[b]-rule[10]"


def test_path_index_with_many_rules_keeps_semantics() -> None:
    rules = "".join(f"  - to:\n    - operation: {{paths: ['/p{i}'], methods: [GET]}}\n" for i in range(300))
    pols = policies_from(P("  rules:\n" + rules + "  - to:\n    - operation: {paths: ['/w*']}\n"))
    r = decide_both(pols, R(path="/p123"))
    assert (r.allowed, r.policy_id) == (True, "ns[foo]-policy[p]-rule[123]")
    assert len(r.trace) <= 2  # only the indexed rule (and none of the other 299) was evaluated
    assert decide_both(pols, R(path="/wild")).allowed
    assert not decide_both(pols, R(path="/p123", method="POST")).allowed


def test_one_compiled_set_decides_many_identities_and_workloads() -> None:
    # The compiled set memoizes per workload (its plan) and per token identity (token fields): equal
    # inputs, repeated or not, and different ones interleaved must each get their own answer.
    compiled = compile_policies(
        policies_from(
            P(
                "  selector: {matchLabels: {app: a}}\n  rules:\n"
                "  - from:\n    - source: {requestPrincipals: ['https://idp/alice']}\n"
                "    when:\n    - key: request.auth.claims[scope]\n      values: [write]\n"
            )
        )
    )
    alice = RequestAuth(claims={"iss": "https://idp", "sub": "alice", "scope": "read write"})
    alice_read = RequestAuth(claims={"iss": "https://idp", "sub": "alice", "scope": "read"})
    bob = RequestAuth(claims={"iss": "https://idp", "sub": "bob", "scope": "write"})
    http = Request(http=HttpAttributes(path="/x"))
    selected, other = Workload("foo", {"app": "a"}), Workload("foo", {"app": "b"})
    for _ in range(2):
        for workload in (selected, Workload("foo", {"app": "a"})):
            assert evaluate(compiled, http, workload, alice, path="/x").allowed
            denied = evaluate(compiled, http, workload, alice_read, path="/x")
            assert not denied.allowed and denied.trace[-1].clause == "when[0].values"
            denied = evaluate(compiled, http, workload, bob, path="/x")
            assert not denied.allowed and denied.trace[-1].clause == "from[0].source.requestPrincipals"
            assert not evaluate(compiled, http, workload, None, path="/x").allowed
        assert evaluate(compiled, http, other, bob, path="/x").reason == Reason.ALLOWED_NO_POLICY
        # TCP: the rule uses HTTP-only fields, so the ALLOW policy denies every connection.
        assert not evaluate(compiled, Request(), selected, alice, path="").allowed

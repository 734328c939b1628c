"""Value matchers, with decision tables transcribed from Istio's unit tests (each case names its source)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.config import MeshConfig
from authz.policy.matchers import (
    claim_values,
    header_matcher,
    istio_string_matcher,
    namespace_matcher,
    path_matcher,
    principal_matcher,
    replace_trust_domain_aliases,
    request_principal_matcher,
    service_account_matcher,
    trust_domain_matcher,
)
from authz.request import RequestAuth


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        # spec §1.7 / istio api message Rule: exact, prefix, suffix, presence.
        ("abc", "abc", True),
        ("abc", "abcd", False),
        ("abc*", "abc", True),
        ("abc*", "abcd", True),
        ("abc*", "xabc", False),
        ("*abc", "abc", True),
        ("*abc", "xabc", True),
        ("*abc", "abcx", False),
        ("*", "x", True),
        ("*", "", False),
        # istio matcher/header_test.go "suffix match": the leading * wins, trailing * is literal.
        ("*/productpage*", "/x/productpage*", True),
        ("*/productpage*", "/x/productpage/1", False),
        # issue #46910: a middle * is literal.
        ("/service/*health", "/service/*health", True),
        ("/service/*health", "/service/xhealth", False),
        # istio matcher/string_test.go TestStringMatcherRegex_Match: metacharacters are literal.
        ("*admin.example", "adminXexample", False),
        ("*admin.example", "x.admin.example", True),
        ("*rule[0]", "my-rule[0]", True),
    ],
)
def test_istio_string_matcher(pattern: str, value: str, expected: bool) -> None:
    assert istio_string_matcher(pattern)(value) is expected


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        # spec §1.8.6; istio authz_test.go TestAuthz_IngressGateway: hosts are case-insensitive.
        ("deny.example.com", "DENY.EXAMPLE.COM", True),
        ("deny.example.com", "Deny.Example.Com", True),
        ("*.suffix.example.com", "www.SUFFIX.example.com", True),
        ("prefix.example.*", "PREFIX.example.org", True),
        ("example.com", "example.com:443", False),  # the port is not stripped (issues #44080, #39810)
        ("example.com:*", "example.com:443", True),
        ("*.example.int:*", "a.example.int:80", False),  # suffix ".example.int:*" with a literal *
        ("*", "", True),  # present_match: a header with an empty value is present
    ],
)
def test_host_matcher(pattern: str, value: str, expected: bool) -> None:
    assert header_matcher(pattern, ignore_case=True)(value) is expected


def test_header_presence_vs_missing() -> None:
    assert header_matcher("*")(None) is False
    assert header_matcher("*")("") is True
    assert header_matcher("abc")(None) is False
    assert header_matcher("ABC")("abc") is False  # header values are case-sensitive


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        # istio builder/testdata/http/allow-full-rule-out.yaml; spec §1.8.1.
        ("cluster.local/ns/foo/sa/bar", "spiffe://cluster.local/ns/foo/sa/bar", True),
        ("cluster.local/ns/foo/*", "spiffe://cluster.local/ns/foo/sa/x", True),
        ("*/sa/bar", "spiffe://td/ns/foo/sa/bar", True),
        # istio matcher/string_test.go "suffix-with-dot" and bulletin 2020-009: needs the spiffe:// prefix.
        ("*/ns/ns1/sa/foo", "spiffe:///ns/ns1/sa/foo", True),
        ("*/ns/ns1/sa/foo", "/ns/ns1/sa/foo", False),
        ("*", "anything", True),
        ("spiffe://cluster.local/ns/foo/sa/bar", "spiffe://cluster.local/ns/foo/sa/bar", False),
    ],
)
def test_principal_matcher(pattern: str, value: str, expected: bool) -> None:
    assert principal_matcher(pattern)(value) is expected


# istio pilot/pkg/security/authz/model/generator_test.go TestServiceAccount (input "my-ns/my-sa").
@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("spiffe://cluster.local/ns/my-ns/sa/my-sa", True),
        ("spiffe://cluster.local/ns/my-ns/sa/my-sa/k/v", True),
        ("spiffe://cluster.local/k/v/ns/my-ns/sa/my-sa", True),
        ("spiffe://cluster.local/ns/my-ns/k/v/sa/my-sa", True),
        ("spiffe://cluster.local/k1/v1/ns/my-ns/k2/v2/sa/my-sa/k3/v3", True),
        ("spiffe://cluster.local/ns/my-ns/sa/my-sa-suffix", False),
        ("spiffe://cluster.local/ns/my-ns-suffix/sa/my-sa", False),
        ("cluster.local/ns/my-ns/sa/my-sa", False),
        ("spiffe://ns/my-ns/sa/my-sa", False),
        ("spiffe://cluster.local/ns/my-ns", False),
        ("spiffe://cluster.local/sa/my-sa", False),
        ("spiffe://cluster.local/k/ns/my-ns/something/bar/sa/my-sa/baz", True),  # "weird keys"
    ],
)
def test_service_account_table(identity: str, expected: bool) -> None:
    assert service_account_matcher("my-ns/my-sa", "ignored")(identity) is expected
    # istio TestServiceAccountRegex: "<sa>" alone uses the policy namespace.
    assert service_account_matcher("my-sa", "my-ns")(identity) is expected


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        # istio generator_test.go srcNamespaceGenerator (regex .*/ns/foo/.*) and
        # TestNamespaceMatcherRegex_Match (ns.*.prod: every * is a wildcard).
        ("foo", "spiffe://cluster.local/ns/foo/sa/x", True),
        ("foo", "spiffe://cluster.local/ns/foobar/sa/x", False),
        ("ns*.prod", "spiffe://td/ns/ns-a.prod/sa/x", True),
        ("*-prod", "spiffe://td/ns/shop-prod/sa/x", True),
        ("*", "spiffe://td/ns/any/sa/x", True),
        ("a*b*c", "spiffe://td/ns/aXbYc/sa/x", True),
    ],
)
def test_namespace_matcher(pattern: str, value: str, expected: bool) -> None:
    assert namespace_matcher(pattern)(value) is expected


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        # spec §1.8.3, istio generator_test.go srcTrustDomainGenerator-*.
        ("td", "spiffe://td/ns/a/sa/b", True),
        ("td", "spiffe://td2/ns/a/sa/b", False),
        ("*", "spiffe://x/ns/a/sa/b", True),
        ("cluster.*", "spiffe://cluster.local/ns/a/sa/b", True),
        ("cluster.*", "spiffe://clusterXlocal/ns/a/sa/b", False),
        ("*local", "spiffe://cluster.local/ns/a/sa/b", True),
        ("*local", "spiffe://local.x/ns/a/sa/b", False),
    ],
)
def test_trust_domain_matcher(pattern: str, value: str, expected: bool) -> None:
    assert trust_domain_matcher(pattern)(value) is expected


# istio pilot/pkg/security/trustdomain/bundle_test.go TestReplaceTrustDomainAliases.
@pytest.mark.parametrize(
    ("td", "aliases", "principals", "expected"),
    [
        ("cluster.local", [], ["cluster.local/ns/foo/sa/bar"], ["cluster.local/ns/foo/sa/bar"]),
        ("cluster.local", [], ["*"], ["*"]),
        ("cluster.local", [], ["*/ns/foo/sa/bar"], ["*/ns/foo/sa/bar"]),
        ("td2", ["td1"], ["td1/ns/foo/sa/bar"], ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]),
        (
            "td1",
            ["cluster.local"],
            ["cluster.local/ns/foo/sa/bar", "cluster.local/ns/yyy/sa/zzz"],
            [
                "td1/ns/foo/sa/bar",
                "cluster.local/ns/foo/sa/bar",
                "td1/ns/yyy/sa/zzz",
                "cluster.local/ns/yyy/sa/zzz",
            ],
        ),
        ("td1", ["cluster.local"], ["*/ns/foo/sa/bar", "*sa/zzz", "*"], ["*/ns/foo/sa/bar", "*sa/zzz", "*"]),
        (
            "td2",
            ["td1", "cluster.local"],
            ["cluster.local/ns/foo/sa/bar", "td1/ns/yyy/sa/zzz"],
            [
                "td2/ns/foo/sa/bar",
                "td1/ns/foo/sa/bar",
                "cluster.local/ns/foo/sa/bar",
                "td2/ns/yyy/sa/zzz",
                "td1/ns/yyy/sa/zzz",
                "cluster.local/ns/yyy/sa/zzz",
            ],
        ),
        (
            "td2",
            ["foo-td1", "cluster.local"],
            ["*-td1/ns/foo/sa/bar"],
            ["td2/ns/foo/sa/bar", "*-td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar"],
        ),
        ("td1", ["td2"], ["some-td/ns/foo/sa/bar"], ["some-td/ns/foo/sa/bar"]),
        (
            "td1",
            ["td2", "some-td"],
            ["some-td/ns/foo/sa/bar"],
            ["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar", "some-td/ns/foo/sa/bar"],
        ),
        (
            "new-td",
            ["td2", "td3"],
            ["td1/ns/some-ns/sa/some-sa", "td2/ns/foo/sa/bar"],
            ["td1/ns/some-ns/sa/some-sa", "new-td/ns/foo/sa/bar", "td2/ns/foo/sa/bar", "td3/ns/foo/sa/bar"],
        ),
        # spec §1.8.1: cluster.local is a pointer to the local trust domain.
        ("td1", [], ["cluster.local/ns/foo/sa/bar"], ["td1/ns/foo/sa/bar"]),
    ],
)
def test_trust_domain_bundle(td: str, aliases: list[str], principals: list[str], expected: list[str]) -> None:
    mesh = MeshConfig(trust_domain=td, trust_domain_aliases=tuple(aliases))
    assert list(replace_trust_domain_aliases(principals, mesh)) == expected


def _auth(iss: object = None, sub: object = None) -> RequestAuth:
    claims = {k: v for k, v in (("iss", iss), ("sub", sub)) if v is not None}
    return RequestAuth(claims=claims)


# istio generator_test.go TestRequestPrincipal (iss/sub matcher per value), as decisions.
@pytest.mark.parametrize(
    ("value", "iss", "sub", "expected"),
    [
        ("*", "a", "b", True),
        ("*", "a", None, False),
        ("*", "", "b", False),
        ("foo*", "foobar", "x", True),  # iss prefix foo, sub .+
        ("foo*", "bar", "x", False),
        ("foo/*", "foo", "anything", True),  # iss exact foo, sub .+
        ("foo/*", "foo/x", "anything", False),
        ("foo/bar*", "foo", "barista", True),  # iss exact, sub prefix
        ("*foo", "any", "xfoo", True),  # iss .+, sub suffix foo
        ("*/foo", "https://idp", "foo", True),  # iss .+, sub exact
        ("*bar/foo", "https://xbar", "foo", True),  # iss suffix bar, sub exact foo
        ("*bar/foo", "https://xbaz", "foo", False),
        ("foo/bar", "foo", "bar", True),
        ("foo/bar", "foo", "bar2", False),
        ("foo", "foo", "", True),  # sub exact "" (spec §1.8.4 table, last row)
        ("foo", "foo", "x", False),
        # split on the LAST '/': issuers that are URLs work, subjects with '/' do not (issue #52217).
        ("https://idp.example.com/alice", "https://idp.example.com", "alice", True),
        ("https://gh.example/repo:o/r:ref", "https://gh.example", "repo:o/r:ref", False),
        ("*/*", "x", "*", True),  # "any iss, sub literally *"
        ("*/*", "x", "y", False),
    ],
)
def test_request_principal_table(value: str, iss: object, sub: object, expected: bool) -> None:
    assert request_principal_matcher(value)(_auth(iss, sub)) is expected


def test_request_principal_without_token() -> None:
    assert request_principal_matcher("*")(None) is False


def test_claim_values() -> None:
    auth = RequestAuth(
        claims={
            "groups": ["a", "b", 3],
            "scope": "read write",
            "custom": "x y",
            "nested": {"k": {"v": "deep"}},
            "admin": True,
            "foo.com/name": "n",
        },
        space_delimited=frozenset({"scope", "permission", "custom"}),
    )
    assert claim_values(auth, ["groups"]) == ["a", "b"]
    assert claim_values(auth, ["scope"]) == ["read", "write"]
    assert claim_values(auth, ["custom"]) == ["x", "y"]
    assert claim_values(auth, ["nested", "k", "v"]) == ["deep"]
    assert claim_values(auth, ["nested", "missing"]) is None
    assert claim_values(auth, ["admin"]) is None  # non-string claims never match (issue #39703)
    assert claim_values(auth, ["foo.com/name"]) == ["n"]
    assert claim_values(None, ["groups"]) is None


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        # istio tests/integration/security/authz_test.go TestAuthz_PathTemplating.
        ("/allow/admin/{**}", "/allow/admin/", True),
        ("/allow/admin/{**}", "/allow/admin/temp", True),
        ("/allow/admin/{**}", "/allow/admin/temp.txt", True),
        ("/allow/admin/{**}", "/allow/admin/foo/temp.txt", True),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/bat.txt", True),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/bat.temp.txt", True),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/bat/fuzz.txt", True),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/bat", True),
        ("/store/{**}/cart", "/store//cart", True),
        ("/store/{**}/cart", "/store/foo/cart", True),
        ("/store/{**}/cart", "/store/foo/bar/cart", True),
        ("/allow/admin/{**}", "/allow/admin", False),
        ("/allow/admin/{**}", "/allow/user/", False),
        ("/allow/admin/{**}", "/allow", False),
        ("/foo/{*}/bar/{**}", "/foo/bar/bat.txt", False),
        ("/foo/{*}/bar/{**}", "/foo//bar/bat.txt", False),
        ("/store/{**}/cart", "/store/cart", False),
        # istio api Operation.paths doc examples.
        ("/foo/{*}", "/foo/bar", True),
        ("/foo/{*}", "/foo/bar/baz", False),
        ("/foo/{**}/", "/foo/bar/", True),
        ("/foo/{**}/", "/foo/bar/baz.txt/", True),
        ("/foo/{**}/", "/foo//", True),
        ("/foo/{**}/", "/foo/bar", False),
    ],
)
def test_path_templates(template: str, path: str, expected: bool) -> None:
    assert path_matcher(template)(path) is expected


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab*/.", max_size=8), st.text(alphabet="ab/.", max_size=8))
def test_string_matcher_properties(pattern: str, value: str) -> None:
    """Exact match on a value without '*' is equality; a trailing-* pattern is a prefix test."""
    got = istio_string_matcher(pattern)(value)
    if "*" not in pattern:
        assert got == (pattern == value)
    elif pattern == "*":
        assert got == (value != "")
    elif pattern.startswith("*"):
        assert got == value.endswith(pattern[1:])
    elif pattern.endswith("*"):
        assert got == value.startswith(pattern[:-1])
    else:
        assert got == (pattern == value)

"""SPIFFE ID parsing: every rule of the SPIFFE ID spec, accessors, and round-trip properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import AuthzError, CredentialError
from authz.identity.spiffe import (
    MAX_SPIFFE_ID_BYTES,
    MAX_TRUST_DOMAIN_BYTES,
    InvalidSpiffeId,
    SpiffeId,
    validate_path,
    validate_trust_domain,
)

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
PATH_CHARS = TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/ns/default/sa/web", "example.org", "/ns/default/sa/web"),
        ("spiffe://cluster.local/ns/a/sa/b", "cluster.local", "/ns/a/sa/b"),
        ("spiffe://td_1-x/Mixed.Case-_/A", "td_1-x", "/Mixed.Case-_/A"),
        ("spiffe://a/...", "a", "/..."),  # three dots is an ordinary segment, not a dot segment
        ("spiffe://a/.hidden", "a", "/.hidden"),
    ],
)
def test_parse_valid(text: str, trust_domain: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert (sid.trust_domain, sid.path) == (trust_domain, path)
    assert str(sid) == text
    assert sid.uri == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "spiffe_id_empty"),
        ("https://example.org/ns/a/sa/b", "spiffe_id_wrong_scheme"),
        ("SPIFFE://example.org/ns/a", "spiffe_id_wrong_scheme"),
        ("spiffe:/example.org", "spiffe_id_wrong_scheme"),
        ("example.org/ns/a", "spiffe_id_wrong_scheme"),
        ("spiffe://", "spiffe_id_missing_trust_domain"),
        ("spiffe:///ns/a", "spiffe_id_missing_trust_domain"),
        ("spiffe://Example.org/ns/a", "spiffe_id_bad_trust_domain_char"),
        ("spiffe://exa mple.org", "spiffe_id_bad_trust_domain_char"),
        ("spiffe://exämple.org", "spiffe_id_bad_trust_domain_char"),
        ("spiffe://example.org:8080/ns/a", "spiffe_id_has_port"),
        ("spiffe://user@example.org/ns/a", "spiffe_id_has_userinfo"),
        ("spiffe://example.org/", "spiffe_id_trailing_slash"),
        ("spiffe://example.org/ns/a/", "spiffe_id_trailing_slash"),
        ("spiffe://example.org//ns", "spiffe_id_empty_segment"),
        ("spiffe://example.org/ns//a", "spiffe_id_empty_segment"),
        ("spiffe://example.org/./a", "spiffe_id_dot_segment"),
        ("spiffe://example.org/ns/../a", "spiffe_id_dot_segment"),
        ("spiffe://example.org/ns/a b", "spiffe_id_bad_path_char"),
        ("spiffe://example.org/ns/%41", "spiffe_id_bad_path_char"),
        ("spiffe://example.org/ns/ü", "spiffe_id_bad_path_char"),
        ("spiffe://example.org/ns/a?x=1", "spiffe_id_has_query_or_fragment"),
        ("spiffe://example.org/ns/a#frag", "spiffe_id_has_query_or_fragment"),
        ("spiffe://example.org?x", "spiffe_id_has_query_or_fragment"),
        ("spiffe://" + "a" * (MAX_TRUST_DOMAIN_BYTES + 1), "spiffe_id_trust_domain_too_long"),
        ("spiffe://a/" + "b" * MAX_SPIFFE_ID_BYTES, "spiffe_id_too_long"),
    ],
)
def test_parse_invalid_names_the_rule(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)
    assert info.value.reason == reason
    assert isinstance(info.value, CredentialError)


def test_length_limits_are_inclusive() -> None:
    longest_td = "a" * MAX_TRUST_DOMAIN_BYTES
    assert SpiffeId.parse(f"spiffe://{longest_td}").trust_domain == longest_td
    prefix = "spiffe://a/"
    exactly = prefix + "b" * (MAX_SPIFFE_ID_BYTES - len(prefix))
    assert str(SpiffeId.parse(exactly)) == exactly
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(exactly + "b")


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(b"spiffe://a/b")  # type: ignore[arg-type]
    assert info.value.reason == "spiffe_id_not_a_string"


def test_constructor_validates() -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId("Bad")
    with pytest.raises(InvalidSpiffeId):
        SpiffeId("td", "no-leading-slash")
    assert validate_trust_domain("td") == "td"
    assert validate_path("") == ""
    with pytest.raises(InvalidSpiffeId) as info:
        validate_path("x/y")
    assert info.value.reason == "spiffe_id_bad_path"


def test_istio_accessors() -> None:
    sid = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
    assert sid.namespace == "shop"
    assert sid.service_account == "cart"
    assert sid.principal == "cluster.local/ns/shop/sa/cart"
    assert sid.trust_domain_id == SpiffeId("cluster.local")
    assert sid.segments == ("ns", "shop", "sa", "cart")
    assert sid.member_of("cluster.local")
    assert not sid.member_of("other.local")
    assert SpiffeId.for_service_account("cluster.local", "shop", "cart") == sid
    assert SpiffeId.of("td", "a", "b") == SpiffeId.parse("spiffe://td/a/b")


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://td",
        "spiffe://td/ns/shop",
        "spiffe://td/ns/shop/sa",
        "spiffe://td/ns/shop/sa/cart/extra",
        "spiffe://td/namespace/shop/sa/cart",
        "spiffe://td/ns/shop/serviceaccount/cart",
    ],
)
def test_non_istio_paths_have_no_namespace(text: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.namespace == ""
    assert sid.service_account == ""


def test_value_semantics() -> None:
    a = SpiffeId.parse("spiffe://td/x")
    assert a == SpiffeId("td", "/x")
    assert hash(a) == hash(SpiffeId("td", "/x"))
    assert a != SpiffeId.parse("spiffe://td/X")  # paths are case-sensitive
    with pytest.raises(AttributeError):
        a.path = "/y"  # type: ignore[misc]


trust_domains = st.text(alphabet=TD_CHARS, min_size=1, max_size=40)
segments = st.text(alphabet=PATH_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))


@settings(max_examples=200, deadline=None)
@given(trust_domains, paths)
def test_round_trip(trust_domain: str, path: str) -> None:
    sid = SpiffeId(trust_domain, path)
    text = str(sid)
    assert SpiffeId.parse(text) == sid
    assert str(SpiffeId.parse(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(max_size=60).map(lambda t: "spiffe://" + t)))
def test_arbitrary_text_raises_only_our_error(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except InvalidSpiffeId as exc:
        assert isinstance(exc, AuthzError)
        assert exc.reason.startswith("spiffe_id_")
    else:
        assert str(sid) == text  # whatever parses, prints back exactly


@settings(max_examples=150, deadline=None)
@given(trust_domains, paths, st.sampled_from(["/", "//", "/.", "/..", "?q", "#f", ":1", " "]))
def test_corruptions_are_refused(trust_domain: str, path: str, junk: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(f"spiffe://{trust_domain}{path}{junk}")

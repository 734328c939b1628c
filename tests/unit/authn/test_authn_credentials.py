"""Token extraction as Envoy's extractor does it; CORS preflight; claims rendering and splitting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.authn.claims import claim_strings, header_value, lookup_claim, safe_header_value
from authz.authn.credentials import (
    TokenExtractor,
    extract_after_prefix,
    is_cors_preflight,
    parse_cookies,
    parse_query,
)
from authz.authn.model import ClaimToHeader, JwtHeader, JwtRule
from authz.request import HttpAttributes

DEFAULT = JwtRule(issuer="a")


def http(path: str = "/", method: str = "GET", **headers: str) -> HttpAttributes:
    return HttpAttributes(
        method=method, path=path, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )


def tokens(rules: list[JwtRule], request: HttpAttributes) -> list[tuple[str, str]]:
    return [(str(t.location), t.token) for t in TokenExtractor(rules).extract(request)]


def test_default_locations_are_bearer_header_and_access_token_param() -> None:
    assert tokens([DEFAULT], http(authorization="Bearer a.b.c")) == [
        ("header authorization (prefix 'Bearer ')", "a.b.c")
    ]
    assert tokens([DEFAULT], http("/p?x=1&access_token=a.b.c")) == [("param access_token", "a.b.c")]


def test_prefix_is_case_sensitive_and_missing_prefix_means_no_token() -> None:
    assert tokens([DEFAULT], http(authorization="bearer a.b.c")) == []
    assert tokens([DEFAULT], http(authorization="Basic dXNlcjpwYXNz")) == []


def test_prefix_is_searched_anywhere_and_token_is_the_following_run() -> None:
    assert tokens([DEFAULT], http(authorization="Custom x, Bearer   a.b-c_d; rest")) == [
        ("header authorization (prefix 'Bearer ')", "a.b-c_d")
    ]


def test_prefix_without_token_characters_returns_the_whole_value() -> None:
    # extractor.cc extractJWT: "if it finds no suitable string, it returns value_str as-is".
    assert tokens([DEFAULT], http(authorization="Bearer !!!")) == [
        ("header authorization (prefix 'Bearer ')", "Bearer !!!")
    ]


def test_header_without_prefix_takes_the_whole_value() -> None:
    rule = JwtRule(issuer="a", from_headers=(JwtHeader("x-jwt"),))
    assert tokens([rule], http(x_jwt=" a.b.c ")) == [("header x-jwt", " a.b.c ")]


def test_configured_locations_disable_the_defaults() -> None:
    rule = JwtRule(issuer="a", from_params=("tok",))
    assert tokens([rule], http("/?access_token=a.b.c", authorization="Bearer a.b.c")) == []
    assert tokens([rule], http("/?tok=x.y.z")) == [("param tok", "x.y.z")]


def test_params_are_percent_decoded_and_first_occurrence_wins() -> None:
    assert parse_query("/p?a=%41%2e&a=second&b=&c#frag") == {"a": "A.", "b": "", "c": ""}
    assert parse_query("/p") == {}


def test_cookies_are_parsed_with_quotes_removed() -> None:
    assert parse_cookies({"cookie": 'a=1; session="x.y.z"; b=2,c=3; a=dup'}) == {
        "a": "1",
        "session": "x.y.z",
        "b": "2",
        "c": "3",
    }
    rule = JwtRule(issuer="a", from_cookies=("session",))
    assert tokens([rule], http(cookie='other=1; session="x.y.z"')) == [("cookie session", "x.y.z")]


def test_locations_are_ordered_headers_params_cookies_and_remember_their_rules() -> None:
    a = JwtRule(issuer="a", from_headers=(JwtHeader("x-b"),), from_cookies=("c",))
    b = JwtRule(issuer="b", from_headers=(JwtHeader("x-a"), JwtHeader("x-b")), from_params=("p",))
    found = TokenExtractor([a, b]).extract(http("/?p=3", x_a="1", x_b="2", cookie="c=4"))
    assert [(t.location.name, t.token, t.rules) for t in found] == [
        ("x-a", "1", (1,)),
        ("x-b", "2", (0, 1)),
        ("p", "3", (1,)),
        ("c", "4", (0,)),
    ]


def test_output_headers_are_always_sanitized() -> None:
    rule = JwtRule(
        issuer="a",
        output_payload_to_header="x-payload",
        output_claim_to_headers=(ClaimToHeader("x-sub", "sub"),),
    )
    assert TokenExtractor([rule]).sanitize == ("x-payload", "x-sub")


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("OPTIONS", {"origin": "https://a", "access-control-request-method": "GET"}, True),
        ("OPTIONS", {"access-control-request-method": "GET"}, False),
        ("OPTIONS", {"origin": "https://a"}, False),
        ("OPTIONS", {"origin": "", "access-control-request-method": "GET"}, False),
        ("GET", {"origin": "https://a", "access-control-request-method": "GET"}, False),
    ],
)
def test_cors_preflight_detection(method: str, headers: dict[str, str], expected: bool) -> None:
    assert is_cors_preflight(HttpAttributes(method=method, headers=headers)) is expected


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=80), start=st.integers(min_value=0, max_value=100))
def test_extract_after_prefix_yields_token_characters_or_the_whole_value(value: str, start: int) -> None:
    out = extract_after_prefix(value, start)
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert out == value or (out and set(out) <= allowed and out in value[start:])


_TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."


def _extract_reference(value: str, start: int) -> str:
    """extractor.cc ``extractJWT`` said plainly: skip non-token characters, take the run that follows."""
    i = start
    while i < len(value) and value[i] not in _TOKEN_CHARS:
        i += 1
    j = i
    while j < len(value) and value[j] in _TOKEN_CHARS:
        j += 1
    return value[i:j] if j > i else value


@settings(max_examples=300, deadline=None)
@given(
    value=st.text(alphabet=st.sampled_from(_TOKEN_CHARS + " ,;\u00e9\x00"), max_size=40)
    | st.text(max_size=40),
    start=st.integers(min_value=0, max_value=45),
)
def test_extract_after_prefix_equals_the_character_scan(value: str, start: int) -> None:
    assert extract_after_prefix(value, start) == _extract_reference(value, start)


@pytest.mark.parametrize(
    ("value", "start", "expected"),
    [
        ("Bearer abc.def-_1", 7, "abc.def-_1"),  # the whole rest (the fast path)
        ("Bearer abc def", 7, "abc"),
        ("Bearer  ,abc", 7, "abc"),
        ("Bearer \u00e9abc", 7, "abc"),  # non-ASCII is not a token character
        ("Bearer ", 7, "Bearer "),  # nothing after the prefix: the whole value (Envoy compatibility)
        ("Bearer ;;", 7, "Bearer ;;"),
    ],
)
def test_extract_after_prefix_examples(value: str, start: int, expected: str) -> None:
    assert extract_after_prefix(value, start) == expected


@settings(max_examples=200, deadline=None)
@given(path=st.text(max_size=80), cookie=st.text(max_size=80), auth=st.text(max_size=80))
def test_extractor_never_raises(path: str, cookie: str, auth: str) -> None:
    rule = JwtRule(
        issuer="a", from_params=("t",), from_cookies=("c",), from_headers=(JwtHeader("authorization", "B "),)
    )
    TokenExtractor([rule, DEFAULT]).extract(http(path, cookie=cookie, authorization=auth))


NESTED = {"sub": "alice", "nested": {"nested-2": {"key2": "v", "n": 7}}, "https://x.test/role": "admin"}


def test_nested_claims_with_dots() -> None:
    assert lookup_claim(NESTED, "nested.nested-2.key2") == "v"
    assert lookup_claim(NESTED, "nested.missing") is None
    assert lookup_claim(NESTED, "https://x.test/role") == "admin"
    assert lookup_claim(NESTED, "sub.x") is None


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("s", "s"),
        (1562182722, "1562182722"),
        (1562182722.0, "1562182722"),
        (True, "true"),
        (False, "false"),
        (1.5, None),
        ([1], None),
        ({"a": 1}, None),
        (None, None),
        ("a\r\nx-evil: 1", None),
        ("nul\x00", None),
    ],
)
def test_claim_header_values_are_rendered_or_dropped(value: object, rendered: str | None) -> None:
    assert header_value(value) == rendered


def test_header_values_keep_tabs_and_refuse_controls_and_huge_values() -> None:
    assert safe_header_value("a\tb") == "a\tb"
    assert safe_header_value("a\x7fb") is None
    assert safe_header_value("x" * 10_000) is None


def test_space_delimited_claims_are_split_only_when_named() -> None:
    claims = {"scope": "read  write", "custom_scope": "a b", "other": "a b", "teams": ["x", 1, "y"]}
    always = {"scope", "permission"}
    assert claim_strings(claims, "scope", always) == ("read", "write")
    assert claim_strings(claims, "custom_scope", always) == ("a b",)
    assert claim_strings(claims, "custom_scope", always | {"custom_scope"}) == ("a", "b")
    assert claim_strings(claims, "other", always) == ("a b",)
    assert claim_strings(claims, "teams", always) == ("x", "y")
    assert claim_strings(claims, "missing", always) == ()

"""normalize_path against istio tests/integration/security/normalization_test.go (TestNormalization)."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.config import PathNormalization as PN
from authz.errors import MalformedRequest
from authz.policy.normalize import check_http_request, normalize_path, split_path
from authz.request import HttpAttributes

# Source: istio tests/integration/security/normalization_test.go, TestNormalization cases.
NONE = [
    ("/", "/"),
    ("/app#foo", "/app"),
    ("/app/", "/app/"),
    ("/app/../admin", "/app/../admin"),
    ("/app", "/app"),
    ("/app//", "/app//"),
    ("/app/%2f", "/app/%2f"),
    ("/app%2f/", "/app%2f/"),
    ("/xyz%30..//abc", "/xyz%30..//abc"),
    ("/app/%2E./admin", "/app/%2E./admin"),
    ("/app\\admin", "/app\\admin"),
    ("/app/\\/\\/\\admin", "/app/\\/\\/\\admin"),
    ("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc"),
    ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc"),
    ("/app//../admin", "/app//../admin"),
    ("/app//../../admin", "/app//../../admin"),
]
BASE = [
    ("/", "/"),
    ("/app#foo", "/app"),
    ("/app/", "/app/"),
    ("/app/../admin", "/admin"),
    ("/app", "/app"),
    ("/app//", "/app//"),
    ("/app/%2f", "/app/%2f"),
    ("/app%2f/", "/app%2f/"),
    ("/xyz%30..//abc", "/xyz0..//abc"),
    ("/app/%2E./admin", "/admin"),
    ("/app\\admin", "/app/admin"),
    ("/app/\\/\\/\\admin", "/app//////admin"),
    ("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc"),
    ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F..%2fadmin%5c/abc"),
    ("/app//../admin", "/app/admin"),
    ("/app//../../admin", "/admin"),
]
MERGE_SLASHES = [
    ("/", "/"),
    ("/app#foo", "/app"),
    ("/app/", "/app/"),
    ("/app/../admin", "/admin"),
    ("/app", "/app"),
    ("/app//", "/app/"),
    ("/app/%2f", "/app/%2f"),
    ("/app%2f/", "/app%2f/"),
    ("/xyz%30..//abc", "/xyz0../abc"),
    ("/app/%2E./admin", "/admin"),
    ("/app\\admin", "/app/admin"),
    ("/app/\\/\\/\\admin", "/app/admin"),
    ("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc"),
    ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F..%2fadmin%5c/abc"),
    ("/app//../admin", "/app/admin"),
    ("/app//../../admin", "/admin"),
]
DECODE_AND_MERGE = [
    ("/", "/"),
    ("/app#foo", "/app"),
    ("/app/", "/app/"),
    ("/app/../admin", "/admin"),
    ("/app", "/app"),
    ("/app//", "/app/"),
    ("/app/%2f", "/app/"),
    ("/app%2f/", "/app/"),
    ("/xyz%30..//abc", "/xyz0../abc"),
    ("/app/%2E./admin", "/admin"),
    ("/app\\admin", "/app/admin"),
    ("/app/\\/\\/\\admin", "/app/admin"),
    ("/%2Fapp%5cadmin%5Cabc", "/app/admin/abc"),
    ("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/app/admin/abc"),
    ("/app//../admin", "/app/admin"),
    ("/app//../../admin", "/admin"),
    ("/%c0%2e%c0%2e/admin", "/%c0.%c0./admin"),
    ("/%c0%2fadmin", "/%c0/admin"),
]
# "NotNormalized" group (DECODE_AND_MERGE_SLASHES): overlong UTF-8, double encoding, path params.
NOT_NORMALIZED = [
    "/0x2e0x2e/admin",
    "/0x2e0x2e0x2fadmin",
    "/0x2e0x2e0x5cadmin",
    "/0x2f0x2fadmin",
    "/0x5c0x5cadmin",
    "/%25c0%25ae%25c1%259cadmin",
    "/%25c0%25ae%25c0%25ae/admin",
    "/%25c0%25afadmin",
    "/%25c1%259cadmin",
    "/%252e%252e/admin",
    "/%252e%252e%252fadmin",
    "/%c1%9cadmin",
    "/%c0%ae%c0%ae/admin",
    "/%c0%afadmin",
    "/.../admin",
    "/..../admin",
    "/..;/admin",
    "/;/admin",
    "/admin;a=b",
    "/admin;a=b/xyz",
    "/admin,a=b/xyz",
    "/Admin",
    "/ADMIN",
]


@pytest.mark.parametrize(
    ("mode", "raw", "expected"),
    [(PN.NONE, i, o) for i, o in NONE]
    + [(PN.BASE, i, o) for i, o in BASE]
    + [(PN.MERGE_SLASHES, i, o) for i, o in MERGE_SLASHES]
    + [(PN.DECODE_AND_MERGE_SLASHES, i, o) for i, o in DECODE_AND_MERGE]
    + [(PN.DECODE_AND_MERGE_SLASHES, p, p) for p in NOT_NORMALIZED],
)
def test_istio_normalization_table(mode: PN, raw: str, expected: str) -> None:
    assert normalize_path(raw, mode) == expected


def _supported_percent_encode(i: int) -> bool:
    """istio normalization_test.go supportedPercentEncode."""
    return (
        i in (0x2D, 0x2E, 0x2F, 0x5C, 0x5F, 0x7E)
        or 0x30 <= i <= 0x39
        or 0x41 <= i <= 0x5A
        or 0x61 <= i <= 0x7A
    )


@pytest.mark.parametrize("i", range(1, 0x100))
def test_istio_percent_encoded_cases(i: int) -> None:
    """istio "PercentEncoded" group: /admin%XX for XX in 01..ff under DECODE_AND_MERGE_SLASHES."""
    raw = f"/admin%{i:02x}"
    expected = raw
    if _supported_percent_encode(i):
        expected = urllib.parse.unquote(raw).replace("\\", "/")
    assert normalize_path(raw, PN.DECODE_AND_MERGE_SLASHES) == expected


@pytest.mark.parametrize("mode", list(PN))
def test_percent_00_is_rejected_in_every_mode(mode: PN) -> None:
    """istio "Invalid" group: /admin%00 -> 400."""
    with pytest.raises(MalformedRequest) as exc:
        normalize_path("/admin%00", mode)
    assert exc.value.reason == "malformed_path"


@pytest.mark.parametrize("raw", ["", "admin", "*", "/a\r\nb", "/a\x00", "/a\tb", "http://x/"])
def test_malformed_paths(raw: str) -> None:
    with pytest.raises(MalformedRequest):
        normalize_path(raw, PN.BASE)


def test_query_and_fragment_are_stripped() -> None:
    assert normalize_path("/allow?param=value", PN.BASE) == "/allow"
    assert normalize_path("/a#frag?x", PN.NONE) == "/a"
    assert split_path("/a?b=c#d") == ("/a", "b=c")


def test_hostile_inputs() -> None:
    assert normalize_path("/public/%2e%2e/admin", PN.BASE) == "/admin"
    assert normalize_path("//admin", PN.BASE) == "//admin"
    assert normalize_path("//admin", PN.MERGE_SLASHES) == "/admin"
    assert normalize_path("/admin;x=y", PN.BASE) == "/admin;x=y"
    assert normalize_path("/caf\u00e9", PN.BASE) == "/caf%C3%A9"
    assert normalize_path("/a b", PN.BASE) == "/a%20b"


def test_double_decoding_ambiguity_is_rejected() -> None:
    # Chromium's canonicalizer turns %%32%66 into %2f; a decoding backend would see '/'.
    with pytest.raises(MalformedRequest):
        normalize_path("/admin%%32%66x", PN.DECODE_AND_MERGE_SLASHES)


_path_chars = st.sampled_from([*list("/\\.%2eEfF5cC0a;=?#~-_ "), "%2e", "%2f", "%5c", "%00", "é", "%c0"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_path_chars, max_size=24).map(lambda xs: "/" + "".join(xs)), st.sampled_from(list(PN)))
def test_normalize_is_idempotent(raw: str, mode: PN) -> None:
    try:
        once = normalize_path(raw, mode)
    except MalformedRequest:
        return
    assert normalize_path(once, mode) == once
    if mode is not PN.NONE:
        assert "/./" not in once + "/" and "/../" not in once + "/"


def test_check_http_request() -> None:
    check_http_request(HttpAttributes(method="GET", host="a.example", headers={"x-a": "b"}))
    for bad in (
        HttpAttributes(method="G T"),
        HttpAttributes(method=""),
        HttpAttributes(host="a b"),
        HttpAttributes(headers={"x-a": "b\r\nx-injected: 1"}),
        HttpAttributes(headers={"bad name": "v"}),
        HttpAttributes(headers={"x": "a\x00"}),
    ):
        with pytest.raises(MalformedRequest):
            check_http_request(bad)


_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _reference_headers_ok(headers: dict[str, str]) -> bool:
    """Per header, as RFC 9110 says: a name is a token (after the ``:`` of a pseudo-header), a value
    has no CR, LF or NUL."""
    for name, value in headers.items():
        bare = name[1:] if name.startswith(":") else name
        if not bare or any(c not in _TOKEN_CHARS for c in bare):
            return False
        if any(c in "\r\n\x00" for c in value):
            return False
    return True


header_names = st.text(alphabet=_TOKEN_CHARS + ": \t\r\n\x00é", min_size=0, max_size=8)
header_values = st.text(alphabet="ab \t\r\n\x00,é:", max_size=8)


@settings(max_examples=300, deadline=None)
@given(headers=st.dictionaries(header_names, header_values, max_size=6))
def test_check_http_request_agrees_with_a_per_header_reference(headers: dict[str, str]) -> None:
    """The joined-string fast path says exactly what checking each header alone says."""
    http = HttpAttributes(method="GET", host="a.example", headers=headers)
    if _reference_headers_ok(headers):
        check_http_request(http)
    else:
        with pytest.raises(MalformedRequest):
            check_http_request(http)

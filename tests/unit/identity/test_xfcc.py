"""x-forwarded-client-cert parsing: Envoy's format, quoting, malformed and duplicated input, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.identity.certs import MAX_XFCC_BYTES, MAX_XFCC_ELEMENTS, InvalidXfcc, XfccElement, parse_xfcc

HASH = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"

# The example from Envoy's documentation (config/http/http_conn_man/headers, x-forwarded-client-cert).
ENVOY_DOC_EXAMPLE = (
    f'By=http://frontend.lyft.com;Hash={HASH};Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";'
    "URI=http://testclient.lyft.com"
)


def test_envoy_documentation_example() -> None:
    (element,) = parse_xfcc(ENVOY_DOC_EXAMPLE)
    assert element == XfccElement(
        by="http://frontend.lyft.com",
        hash=HASH,
        subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client",
        uris=("http://testclient.lyft.com",),
    )


def test_envoy_documentation_two_elements_and_repeated_sans() -> None:
    value = (
        f"By=http://frontend.lyft.com;Hash={HASH};URI=http://testclient.lyft.com,"
        f"By=http://backend.lyft.com;Hash={HASH};URI=http://frontend.lyft.com;DNS=lyft.com;DNS=www.lyft.com"
    )
    first, second = parse_xfcc(value)
    assert first.by == "http://frontend.lyft.com"
    assert second.by == "http://backend.lyft.com"
    assert second.uris == ("http://frontend.lyft.com",)
    assert second.dns == ("lyft.com", "www.lyft.com")


def test_keys_are_case_insensitive_and_values_are_not() -> None:
    (element,) = parse_xfcc("by=spiffe://td/Proxy;uri=spiffe://td/A;HASH=" + HASH.upper())
    assert element.by == "spiffe://td/Proxy"
    assert element.uris == ("spiffe://td/A",)
    assert element.hash == HASH  # normalized to lower case hex


def test_quoted_values_with_separators_and_escaped_quotes() -> None:
    (element,) = parse_xfcc(r'Subject="CN=a\"b\",O=x;y=z";URI="spiffe://td/a"')
    assert element.subject == 'CN=a"b",O=x;y=z'
    assert element.uris == ("spiffe://td/a",)


def test_cert_and_chain_are_url_decoded() -> None:
    (element,) = parse_xfcc('Cert="-----BEGIN%20CERTIFICATE-----%0AMIIB%2B%0A";Chain=abc%3D')
    assert element.cert == "-----BEGIN CERTIFICATE-----\nMIIB+\n"
    assert element.chain == "abc="


def test_empty_uri_is_no_uri_and_unknown_keys_are_ignored() -> None:
    (element,) = parse_xfcc("By=spiffe://td/gw;URI=;DNS=;Future=thing")
    assert element.uris == ()
    assert element.dns == ()


def test_optional_whitespace_around_elements() -> None:
    assert len(parse_xfcc("URI=spiffe://td/a , URI=spiffe://td/b")) == 2


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "xfcc_empty"),
        ("   ", "xfcc_empty"),
        ("URI", "xfcc_malformed"),
        ("=x", "xfcc_malformed"),
        ("URI=a;", "xfcc_malformed"),
        ("URI=a,", "xfcc_malformed"),
        ("URI=a,,URI=b", "xfcc_malformed"),
        ("URI=a;;Hash=b", "xfcc_malformed"),
        ('Subject="unterminated', "xfcc_malformed"),
        ('Subject="a"b', "xfcc_malformed"),
        ("Subject=a=b", "xfcc_malformed"),
        ('Subject=a"b', "xfcc_malformed"),
        ('URI="a";Subject="b\\"', "xfcc_malformed"),
        ("By=a;By=b", "xfcc_duplicate_key"),
        (f"Hash={HASH};hash={HASH}", "xfcc_duplicate_key"),
        ("Cert=a;CERT=b", "xfcc_duplicate_key"),
        ("Hash=abc", "xfcc_bad_hash"),
        ("Hash=" + "z" * 64, "xfcc_bad_hash"),
        (",".join(["URI=a"] * (MAX_XFCC_ELEMENTS + 1)), "xfcc_too_many_elements"),
        ("URI=" + "a" * MAX_XFCC_BYTES, "xfcc_too_large"),
    ],
)
def test_malformed(value: str, reason: str) -> None:
    with pytest.raises(InvalidXfcc) as info:
        parse_xfcc(value)
    assert info.value.reason == reason


def test_element_limit_is_inclusive() -> None:
    assert len(parse_xfcc(",".join(["URI=a"] * MAX_XFCC_ELEMENTS))) == MAX_XFCC_ELEMENTS


def _quote(value: str) -> str:
    """Envoy's encoding of a value: quoted, with ``"`` escaped as ``\\"``."""
    return '"' + value.replace('"', '\\"') + '"'


values = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\\"), max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"by": values, "subject": values, "uris": st.lists(values.filter(bool), max_size=3)}
        ),
        min_size=1,
        max_size=4,
    )
)
def test_round_trip_of_quoted_values(elements: list[dict[str, object]]) -> None:
    parts = []
    for e in elements:
        pairs = [f"By={_quote(str(e['by']))}", f"Subject={_quote(str(e['subject']))}"]
        pairs += [f"URI={_quote(u)}" for u in e["uris"]]  # type: ignore[attr-defined]
        parts.append(";".join(pairs))
    parsed = parse_xfcc(",".join(parts))
    assert [(p.by, p.subject, list(p.uris)) for p in parsed] == [
        (e["by"], e["subject"], e["uris"]) for e in elements
    ]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('By=;,"\\ URIHashCert%a0')) | st.characters(), max_size=120))
def test_arbitrary_text_never_crashes(value: str) -> None:
    try:
        elements = parse_xfcc(value)
    except InvalidXfcc as exc:
        assert exc.reason.startswith("xfcc_")
    else:
        assert 1 <= len(elements) <= MAX_XFCC_ELEMENTS
        assert all(isinstance(e, XfccElement) for e in elements)

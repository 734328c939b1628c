"""VirtualService ``redirect`` / ``directResponse``: parsing and istiod's validation (errors name
file:line:field), and the Location built as Envoy's ``Http::Utility::newUri`` builds it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import ConfigErrors
from authz.proxy.loader import parse_resources
from authz.proxy.local_reply import direct_reply, redirect_location, redirect_port, redirect_reply
from authz.proxy.model import DirectResponse, HTTPRedirect
from authz.proxy.settings import SidecarConfig
from authz.resources import parse_documents

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [reviews]
  http:
"""  # the first rule starts on line 7


def load(text: str) -> SidecarConfig:
    return parse_resources(parse_documents(text, "mesh.yaml"))


def errors_of(snippet: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigErrors) as info:
        load(VS + snippet)
    return [(e.line, e.field, str(e)) for e in info.value.errors]


# -- parsing ---------------------------------------------------------------------------------------------


def test_redirect_fields_and_istio_defaults() -> None:
    cfg = load(
        VS + "  - name: moved\n    redirect: {uri: /new, authority: b.example.com}\n"
        "  - redirect:\n      scheme: https\n      port: 8443\n      redirectCode: 308\n"
        "  - redirect: {derivePort: FROM_REQUEST_PORT, scheme: http}\n"
    )
    r0, r1, r2 = cfg.mesh.virtual_services[0].http
    assert r0.redirect == HTTPRedirect(uri="/new", authority="b.example.com", code=301)  # 301 when unset
    assert r0.destinations == () and r0.direct_response is None
    assert r1.redirect == HTTPRedirect(scheme="https", port=8443, code=308)
    assert r2.redirect == HTTPRedirect(derive_port="FROM_REQUEST_PORT", scheme="http")


def test_direct_response_string_bytes_and_no_body() -> None:
    cfg = load(
        VS + "  - directResponse: {status: 418, body: {string: teapot}}\n"
        "  - directResponse: {status: 200, body: {bytes: AAEC/w==}}\n"
        "  - directResponse: {status: 204}\n"
    )
    r0, r1, r2 = cfg.mesh.virtual_services[0].http
    assert r0.direct_response == DirectResponse(418, b"teapot")
    assert r1.direct_response == DirectResponse(200, b"\x00\x01\x02\xff")  # protobuf JSON: bytes are base64
    assert r2.direct_response == DirectResponse(204, b"")
    assert r0.destinations == ()


def test_response_header_operations_are_kept_on_local_replies() -> None:
    cfg = load(VS + "  - directResponse: {status: 200}\n    headers: {response: {set: {x-a: b}}}\n")
    assert cfg.mesh.virtual_services[0].http[0].headers.response.set == (("x-a", "b"),)


@pytest.mark.parametrize(
    ("snippet", "line", "field", "words"),
    [
        (  # IST validateHTTPRouteConflict, each conflict names the field that conflicts
            "  - redirect: {uri: /x}\n    route: [{destination: {host: a}}]\n",
            8,
            "spec.http[0].route",
            "both route and redirect",
        ),
        (
            "  - redirect: {uri: /x}\n    directResponse: {status: 200}\n",
            8,
            "spec.http[0].directResponse",
            "both directResponse and redirect",
        ),
        (
            "  - directResponse: {status: 200}\n    route: [{destination: {host: a}}]\n",
            8,
            "spec.http[0].route",
            "both route and direct_response",
        ),
        (
            "  - redirect: {uri: /x}\n    fault: {abort: {httpStatus: 500}}\n",
            8,
            "spec.http[0].fault",
            "both fault and redirect",
        ),
        ("  - redirect: {uri: /x}\n    rewrite: {uri: /y}\n", 8, "spec.http[0].rewrite", "rewrite"),
        (
            "  - directResponse: {status: 200}\n\n    fault: {delay: {fixedDelay: 1s}}\n",
            9,
            "spec.http[0].fault",
            "both fault and direct_response",
        ),
        ("  - directResponse: {status: 200}\n    rewrite: {uri: /y}\n", 8, "spec.http[0].rewrite", "rewrite"),
        (  # IST ApplyRedirect knows 301, 302, 303, 307, 308 only
            "  - redirect:\n      uri: /x\n      redirectCode: 300\n",
            9,
            "spec.http[0].redirect.redirectCode",
            "301, 302, 303, 307, 308",
        ),
        (
            "  - redirect:\n      scheme: ftp\n",
            8,
            "spec.http[0].redirect.scheme",
            'must be "http" or "https"',
        ),
        ("  - redirect: {}\n", 7, "spec.http[0].redirect", "must specify uri, authority, scheme, or port"),
        (
            "  - redirect:\n      port: 8080\n      derivePort: FROM_REQUEST_PORT\n",
            9,
            "spec.http[0].redirect.derivePort",
            "oneof",
        ),
        (
            "  - redirect:\n      derivePort: FROM_SOMEWHERE\n",
            8,
            "spec.http[0].redirect.derivePort",
            "FROM_PROTOCOL_DEFAULT",
        ),
        ("  - redirect:\n      port: 70000\n", 8, "spec.http[0].redirect.port", "[1, 65535]"),
        ("  - redirect:\n      url: /x\n", 8, "spec.http[0].redirect.url", "unknown HTTPRedirect field"),
        (
            "  - redirect:\n      authority: a.example.com/path\n",
            8,
            "spec.http[0].redirect.authority",
            "without a path",
        ),
        (
            "  - directResponse:\n      body: {string: x}\n",
            8,
            "spec.http[0].directResponse.status",
            "status is required",
        ),
        (
            "  - directResponse:\n      status: 100\n",
            8,
            "spec.http[0].directResponse.status",
            "[200, 599]",
        ),
        (
            "  - directResponse:\n      status: 200\n      body: {string: a, bytes: YQ==}\n",
            9,
            "spec.http[0].directResponse.body",
            "exactly one of string, bytes",
        ),
        (
            "  - directResponse:\n      status: 200\n      body:\n        bytes: '%%%'\n",
            10,
            "spec.http[0].directResponse.body.bytes",
            "base64",
        ),
        (
            f"  - directResponse:\n      status: 200\n      body: {{string: {'x' * (1024 * 1024 + 1)}}}\n",
            9,
            "spec.http[0].directResponse.body",
            "less than 1MB",
        ),
        ("  - name: nothing\n", 7, "spec.http[0].route", "at least one destination"),
    ],
)
def test_validation_errors_name_file_line_and_field(snippet: str, line: int, field: str, words: str) -> None:
    errors = errors_of(snippet)
    assert (line, field) == errors[0][:2]
    assert errors[0][2].startswith(f"mesh.yaml:{line}: {field}: ")
    assert words in errors[0][2]


def test_every_conflict_is_reported() -> None:
    errors = errors_of(
        "  - redirect: {uri: /x}\n    route: [{destination: {host: a}}]\n"
        "    fault: {abort: {httpStatus: 500}}\n    rewrite: {uri: /y}\n"
    )
    assert [f for _, f, _ in errors] == ["spec.http[0].route", "spec.http[0].fault", "spec.http[0].rewrite"]


# -- the Location (cases checked against Envoy 1.40: tests/integration/test_proxy_redirect_oracle.py) ---


def location(redirect: HTTPRedirect, authority: str, target: str, *, xfp: str = "http") -> str:
    return redirect_location(redirect, scheme="http", authority=authority, target=target, forwarded_proto=xfp)


@pytest.mark.parametrize(
    ("redirect", "authority", "target", "expected"),
    [
        (
            HTTPRedirect(uri="/new", authority="b.example"),
            "a.example",
            "/old/x?y=1",
            "http://b.example/new?y=1",
        ),
        (HTTPRedirect(uri="/z?a=1"), "a.example", "/q?b=2", "http://a.example/z?a=1"),  # uri's query wins
        (HTTPRedirect(uri="/new"), "a.example", "/old", "http://a.example/new"),
        (HTTPRedirect(uri="new"), "a.example", "/old", "http://a.example/new"),  # a leading "/" is added
        (HTTPRedirect(authority="b.example"), "a.example:8080", "/p?q", "http://b.example/p?q"),
        (HTTPRedirect(scheme="https", port=8443), "a.example:80", "/p?y=1", "https://a.example:8443/p?y=1"),
        (HTTPRedirect(scheme="https"), "a.example:80", "/s?k", "https://a.example/s?k"),  # :80 was http's
        (HTTPRedirect(scheme="https"), "a.example:8080", "/s", "https://a.example:8080/s"),
        (HTTPRedirect(scheme="https", port=443), "a.example:80", "/", "https://a.example/"),  # 443 is https's
        (HTTPRedirect(port=443), "a.example", "/", "http://a.example:443/"),  # ... but not http's
        (HTTPRedirect(scheme="https", port=80), "a.example", "/", "https://a.example:80/"),
        (
            HTTPRedirect(derive_port="FROM_REQUEST_PORT", uri="/n"),
            "a.example:8080",
            "/o",
            "http://a.example:8080/n",
        ),
        (HTTPRedirect(derive_port="FROM_REQUEST_PORT", uri="/n"), "a.example", "/o", "http://a.example/n"),
        (  # FROM_PROTOCOL_DEFAULT writes no port: Envoy keeps the Host as it came
            HTTPRedirect(derive_port="FROM_PROTOCOL_DEFAULT", uri="/n"),
            "a.example:8080",
            "/o",
            "http://a.example:8080/n",
        ),
        (HTTPRedirect(port=9000), "[::1]:8080", "/x", "http://[::1]:9000/x"),
        (HTTPRedirect(uri="/n"), "A.Example:81", "/o", "http://A.Example:81/n"),  # the Host as written
    ],
)
def test_location_as_envoy_builds_it(
    redirect: HTTPRedirect, authority: str, target: str, expected: str
) -> None:
    assert location(redirect, authority, target) == expected


def test_forwarded_proto_decides_which_default_port_is_dropped() -> None:
    # Envoy processRequestHost: the port is dropped when it is the default of the request's x-forwarded-proto
    assert location(HTTPRedirect(scheme="http"), "a.example:443", "/", xfp="https") == "http://a.example/"
    assert location(HTTPRedirect(scheme="http"), "a.example:443", "/", xfp="http") == "http://a.example:443/"


def test_redirect_port_per_istiod() -> None:
    assert redirect_port(HTTPRedirect(uri="/x"), scheme="http", authority="a:8080") == 0
    assert redirect_port(HTTPRedirect(derive_port="FROM_REQUEST_PORT"), scheme="http", authority="a:81") == 81
    assert redirect_port(HTTPRedirect(derive_port="FROM_REQUEST_PORT"), scheme="http", authority="a:80") == 0
    assert (
        redirect_port(
            HTTPRedirect(derive_port="FROM_REQUEST_PORT", scheme="https"), scheme="http", authority="a"
        )
        == 80
    )


_segment = st.text(alphabet="abcxyz019-._~", min_size=1, max_size=8)
_path = st.lists(_segment, min_size=0, max_size=4).map(lambda parts: "/" + "/".join(parts))
_query = st.one_of(st.just(""), st.text(alphabet="abc=&%20", max_size=10).map(lambda q: "?" + q))
_host = st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z]{2,5}){0,2}", fullmatch=True)
_port = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))


@settings(max_examples=150, deadline=None)
@given(path=_path, query=_query, host=_host, port=_port, new_path=_path, new_host=_host)
def test_location_replaces_exactly_what_the_redirect_names(
    *, path: str, query: str, host: str, port: str, new_path: str, new_host: str
) -> None:
    authority = host + port
    # uri only: same scheme and Host, new path, the request's query kept
    assert (
        location(HTTPRedirect(uri=new_path), authority, path + query)
        == f"http://{authority}{new_path}{query}"
    )
    # authority only: the path and query unchanged
    assert (
        location(HTTPRedirect(authority=new_host), authority, path + query)
        == f"http://{new_host}{path}{query}"
    )
    # an explicit port replaces the request's port, whatever it was
    got = location(HTTPRedirect(port=8443), authority, path + query)
    assert got == f"http://{host}:8443{path}{query}"


def test_redirect_reply_is_an_empty_answer_with_the_location() -> None:
    resp = redirect_reply(
        HTTPRedirect(uri="/n", code=302), scheme="http", authority="a", target="/o?x", forwarded_proto="http"
    )
    assert (resp.status, resp.reason, resp.length) == (302, "Found", 0)
    assert resp.headers == [("location", "http://a/n?x")]


async def test_direct_reply_has_the_body_and_a_content_type_only_with_a_body() -> None:
    resp = direct_reply(DirectResponse(418, b"teapot"))
    assert (resp.status, resp.length, await resp.body.read()) == (418, 6, b"teapot")
    assert ("content-type", "text/plain") in resp.headers
    empty = direct_reply(DirectResponse(200))
    assert (empty.length, empty.headers) == (0, [])


def docs_block(heading: str) -> str:
    """The first unlabelled code block after ``heading`` in docs/proxy.md."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "proxy.md").read_text()
    section = text[text.index(heading) :]
    m = re.search(r"^```\n(.*?)^```", section, re.S | re.M)
    assert m is not None, heading
    return m.group(1)


def test_the_documented_example_loads() -> None:
    rules = load(VS.replace("  http:\n", "") + docs_block("## Redirects and direct responses"))
    moved, https, maintenance = rules.mesh.virtual_services[0].http
    assert moved.redirect == HTTPRedirect(uri="/new", authority="new.example.com")
    assert https.redirect == HTTPRedirect(scheme="https", port=8443, code=302)
    assert maintenance.direct_response == DirectResponse(503, b"down for maintenance")
    assert maintenance.headers.response.set == (("retry-after", "120"),)


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.text(alphabet="abc/?:.=%& -", max_size=12),
    st.sampled_from(["https", "http", "FROM_REQUEST_PORT", "FROM_PROTOCOL_DEFAULT", "AAEC", "/x"]),
)
_field = st.sampled_from(
    ["uri", "authority", "port", "derivePort", "scheme", "redirectCode", "status", "body", "string", "bytes"]
)
_value = st.recursive(_scalar, lambda inner: st.dictionaries(_field, inner, max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(["redirect", "directResponse"]), spec=_value)
def test_any_redirect_or_direct_response_loads_or_names_its_field(kind: str, spec: object) -> None:
    import yaml

    snippet = "  - " + yaml.safe_dump({kind: spec}, default_flow_style=True, width=10_000)
    try:
        cfg = load(VS + snippet)
    except ConfigErrors as exc:
        assert all(e.field.startswith("spec.http[0]") and e.line >= 7 for e in exc.errors)
        return
    route = cfg.mesh.virtual_services[0].http[0]
    assert (route.redirect is None) != (route.direct_response is None)
    if route.redirect is not None:
        assert route.redirect.code in (301, 302, 303, 307, 308)
        assert location(route.redirect, "a.example:8080", "/p?q").startswith(("http://", "https://"))
    else:
        assert route.direct_response is not None and 200 <= route.direct_response.status <= 599

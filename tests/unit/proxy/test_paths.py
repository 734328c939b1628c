"""Request-target normalization before routing (Envoy HCM ``normalize_path`` + ``merge_slashes`` +
``path_with_escaped_slashes_action`` as istiod sets them per meshConfig ``pathNormalization``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.config import PathNormalization
from authz.errors import MalformedRequest
from authz.policy.normalize import normalize_path
from authz.proxy.loader import parse_resources
from authz.proxy.paths import PathNormalizer, escape_nested_percents
from authz.resources import parse_documents

BASE = PathNormalization.BASE
MERGE = PathNormalization.MERGE_SLASHES
DECODE = PathNormalization.DECODE_AND_MERGE_SLASHES
NONE = PathNormalization.NONE

# (target, mode, expected) -- the expected values are what Envoy 1.40 forwarded for the same HCM settings.
CASES = [
    ("/a/../b", BASE, "/b"),
    ("/%2e%2e/b?x=/../", BASE, "/b?x=/../"),
    ("/x/%2E%2E/b", BASE, "/b"),
    ("/ex%61ct", BASE, "/exact"),
    ("/a\\..\\b", BASE, "/b"),
    ("/exact/.", BASE, "/exact/"),
    ("//a", BASE, "//a"),
    ("/a//b/../c", BASE, "/a//c"),
    ("/a//b/../c", MERGE, "/a/c"),
    ("//a", MERGE, "/a"),
    ("/a%2F..%2Fb", BASE, "/a%2F..%2Fb"),
    ("/a%2F..%2Fb", MERGE, "/a%2F..%2Fb"),
    ("/a%2F..%2Fb", DECODE, "/b"),
    ("/%2Fb", DECODE, "/b"),
    ("/a%5c..%5cb", DECODE, "/b"),
    ("/a;b/../c", BASE, "/c"),
    ("/%7e%7E", BASE, "/~~"),
    ("/a/../b", NONE, "/a/../b"),
    ("/plain/path?q=1", BASE, "/plain/path?q=1"),
    ("*", BASE, "*"),
]


@pytest.mark.parametrize(("target", "mode", "expected"), CASES)
def test_normalizes_like_envoy(target: str, mode: PathNormalization, expected: str) -> None:
    assert PathNormalizer(mode).normalize(target) == expected


@pytest.mark.parametrize("mode", list(PathNormalization))
@pytest.mark.parametrize("target", ["/a%00b", "/%00", "/a#frag", "/a?b#c"])
def test_rejects_nul_and_fragments(mode: PathNormalization, target: str) -> None:
    if mode is NONE and "%00" in target:
        assert PathNormalizer(mode).normalize(target) == target  # normalize_path=false: Envoy forwards it
        return
    with pytest.raises(MalformedRequest) as err:
        PathNormalizer(mode).normalize(target)
    assert err.value.reason == "malformed_path"


def test_the_cache_is_bounded_and_serves_repeats() -> None:
    n = PathNormalizer(BASE, cache_size=3)
    for i in range(10):
        assert n.normalize(f"/a/../{i}") == f"/{i}"
    assert len(n._cache) == 3
    assert list(n._cache) == ["/a/../7", "/a/../8", "/a/../9"]
    assert n.normalize("/a/../9?q") == "/9?q"


def test_plain_paths_skip_the_cache() -> None:
    n = PathNormalizer(BASE)
    assert n.normalize("/api/v1/items-1_2~x;y=z") == "/api/v1/items-1_2~x;y=z"
    assert n._cache == {}


_target_parts = st.sampled_from(
    [*"/.%2eEfF5cCaA0\\;?#~-_z", "%2e", "%2F", "%5c", "%41", "%62", "%30", "%25", "..", "//", "%00"]
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_target_parts, max_size=14).map(lambda parts: "/" + "".join(parts)),
    st.sampled_from(list(PathNormalization)),
)
def test_only_nul_and_fragments_are_rejected_and_the_result_is_stable(
    target: str, mode: PathNormalization
) -> None:
    """With nested escapes written ``%25`` as Envoy writes them, the engine's ambiguity rule never fires:
    only ``#`` and ``%00`` are refused. The result is a fixed point for the proxy and the engine alike, so
    the engine normalizing the forwarded path again matches policies against exactly that path."""
    normalizer = PathNormalizer(mode)
    path = target.partition("?")[0]
    try:
        out = normalizer.normalize(target)
    except MalformedRequest:
        assert "#" in target or ("%00" in path and mode is not NONE)
        return
    assert "#" not in target
    out_path, _, query = out.partition("?")
    assert query == target.partition("?")[2]
    assert normalizer.normalize(out) == out
    if mode is not NONE:
        assert normalize_path(out_path, mode) == out_path
        assert normalize_path(escape_nested_percents(path), mode) == out_path


def test_nested_escapes_become_percent_25() -> None:
    cases = {
        "/%%32%66": "/%25%32%66",
        "/%a%62": "/%25a%62",
        "/%%414": "/%25%414",
        "/%%41z": "/%%41z",
        "/%zz": "/%zz",
        "/%%%34%31": "/%%25%34%31",
        "/plain": "/plain",
    }
    assert {k: escape_nested_percents(k) for k in cases} == cases


def _proxy_config(extra: str) -> str:
    return f"""
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: p, namespace: default}}
spec:
{extra}"""


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("  accessLog: false\n", BASE),
        ("  pathNormalization: {normalization: DEFAULT}\n", BASE),
        ("  pathNormalization: {normalization: NONE}\n", NONE),
        ("  pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}\n", DECODE),
    ],
)
def test_proxy_config_sets_the_mode(spec: str, expected: PathNormalization) -> None:
    config = parse_resources(parse_documents(_proxy_config(spec), "p.yaml"))
    assert config.settings.path_normalization is expected


def test_proxy_config_rejects_an_unknown_mode_naming_the_field() -> None:
    with pytest.raises(Exception) as err:
        parse_resources(
            parse_documents(_proxy_config("  pathNormalization: {normalization: SOME}\n"), "p.yaml")
        )
    assert "pathNormalization.normalization" in str(err.value)

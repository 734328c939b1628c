"""YAML resources keep file:line:field for every error and never fail with a foreign exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import ConfigErrors
from authz.resources import parse_documents

DOC = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["a"]
"""


def test_positions_are_recorded_per_field() -> None:
    (res,) = parse_documents(DOC, "f.yaml")
    assert (res.kind, res.name, res.namespace, res.line) == ("AuthorizationPolicy", "p", "foo", 1)
    assert res.line_of(("spec", "rules", 0, "from", 0, "source", "principals")) == 11
    assert res.line_of(("spec", "rules", 0, "nope")) == 9  # deepest known ancestor
    err = res.error(("spec", "action"), "bad")
    assert str(err) == "f.yaml:7: spec.action: AuthorizationPolicy foo/p: bad"


def test_multi_document_and_default_namespace() -> None:
    text = (
        "apiVersion: v1\nkind: A\nmetadata: {name: a}\n---\n---\n"
        "apiVersion: v1\nkind: B\nmetadata: {name: b}\n"
    )
    docs = parse_documents(text)
    assert [(d.kind, d.namespace, d.line) for d in docs] == [("A", "default", 1), ("B", "default", 6)]


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("apiVersion: v1\nkind: A\nmetadata: {name: a}\nspec: {x: 1, x: 2}\n", 4, "spec.x"),
        ("kind: A\nmetadata: {name: a}\n", 1, "apiVersion"),
        ("apiVersion: v1\nkind: A\nmetadata: {}\n", 3, "metadata.name"),
        ("apiVersion: v1\nkind: A\nmetadata: {name: a}\nspec: [\n", 5, ""),
        ("- 1\n- 2\n", 1, ""),
    ],
)
def test_errors_name_line_and_field(text: str, line: int, field: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_documents(text, "x.yaml")
    (err,) = info.value.errors
    assert (err.file, err.line, err.field) == ("x.yaml", line, field)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_config_errors(text: str) -> None:
    try:
        parse_documents(text)
    except ConfigErrors as exc:
        assert all(e.file == "<string>" for e in exc.errors)

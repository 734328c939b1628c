"""The shared values' fast constructor builds exactly what the dataclass constructor builds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from authz.decision import Decision, HeaderOps, ShadowResult, TraceEntry, value_builder
from authz.policy.evaluate import PolicyResult
from authz.request import HttpAttributes, Peer, Request


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (Decision, {"allowed": True, "status": 200, "reason": "allowed_by_policy"}),
        (
            Decision,
            {
                "allowed": False,
                "status": 403,
                "reason": "no_allow_match",
                "message": "RBAC: access denied",
                "policy_id": "none",
                "trace": (TraceEntry("allow", "ns[a]-policy[p]", 0, False, clause="rules[0]"),),
                "headers": HeaderOps(set=(("x-a", "1"),)),
                "principal": "spiffe://td/ns/a/sa/b",
                "request_principal": "iss/sub",
                "claims": {"sub": "sub"},
                "audit": True,
                "audit_policy_id": "ns[a]-policy[au]-rule[0]",
                "shadow": ShadowResult(allowed=True, policy_id="x"),
                "decision_id": "ab-1",
                "normalized_path": "/x",
            },
        ),
        (Request, {}),
        (Request, {"source": Peer("10.0.0.1", 5), "http": HttpAttributes(path="/p"), "sni": "s"}),
        (HttpAttributes, {"method": "POST", "headers": {"a": "b"}, "validated": True}),
        (PolicyResult, {"allowed": True, "reason": "r", "policy_id": "p"}),
    ],
)
def test_builder_equals_the_constructor(cls: type[Any], kwargs: dict[str, Any]) -> None:
    built = value_builder(cls)(**kwargs)
    expected = cls(**kwargs)
    assert type(built) is cls and built == expected
    assert [getattr(built, f.name) for f in dataclasses.fields(cls)] == [
        getattr(expected, f.name) for f in dataclasses.fields(cls)
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.__setattr__(dataclasses.fields(cls)[0].name, None)


def test_builder_calls_default_factories_per_value() -> None:
    @dataclass(frozen=True, slots=True)
    class Bag:
        items: list[int] = field(default_factory=list)

    build = value_builder(Bag)
    first, second = build(), build()
    assert first.items == [] and first.items is not second.items


def test_builder_refuses_missing_or_unknown_fields() -> None:
    build = value_builder(Decision)
    with pytest.raises(TypeError):
        build(allowed=True, status=200)  # reason is required
    with pytest.raises(TypeError):
        build(allowed=True, status=200, reason="r", colour="red")
    with pytest.raises(TypeError):
        build(True, 200, "r")  # keyword-only


def test_builder_refuses_classes_it_cannot_build_faithfully() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    for cls in (NoSlots, NotFrozen, PostInit, int):
        with pytest.raises(TypeError):
            value_builder(cls)

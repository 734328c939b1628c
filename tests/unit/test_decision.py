"""The shared values' fast constructor builds exactly what the dataclass constructor builds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz import decision as decision_module
from authz.decision import Decision, HeaderOps, ShadowResult, TraceEntry, value_builder, with_decision_id
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


def test_builder_builds_classes_without_slots_through_their_dict() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int
        b: list[int] = field(default_factory=list)
        c: str = "c"

    build = value_builder(NoSlots)
    first, second = build(a=1), build(a=1)
    assert first == NoSlots(1) and vars(first) == vars(NoSlots(1)) and first.b is not second.b
    assert build(a=2, b=[3], c="d") == NoSlots(2, [3], "d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.a = 5  # type: ignore[misc]


def test_builder_refuses_classes_it_cannot_build_faithfully() -> None:
    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    for cls in (NotFrozen, PostInit, int):
        with pytest.raises(TypeError):
            value_builder(cls)


_decisions = st.builds(
    Decision,
    allowed=st.booleans(),
    status=st.sampled_from([200, 400, 401, 403]),
    reason=st.text(max_size=8),
    message=st.text(max_size=8),
    policy_id=st.text(max_size=8),
    trace=st.lists(
        st.builds(
            TraceEntry, st.sampled_from(["deny", "allow"]), st.text(max_size=5), st.none(), st.booleans()
        ),
        max_size=2,
    ).map(tuple),
    headers=st.builds(HeaderOps, remove=st.lists(st.text(max_size=5), max_size=2).map(tuple)),
    principal=st.text(max_size=8),
    claims=st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    audit=st.booleans(),
    shadow=st.none() | st.builds(ShadowResult, st.booleans(), st.text(max_size=5)),
    decision_id=st.text(max_size=8),
    normalized_path=st.text(max_size=8),
)


@given(_decisions, st.text(max_size=12))
def test_with_decision_id_is_replace(decision: Decision, decision_id: str) -> None:
    before = dict(vars(decision))
    stamped = with_decision_id(decision, decision_id)
    expected = dataclasses.replace(decision, decision_id=decision_id)
    assert type(stamped) is Decision and stamped == expected and vars(stamped) == vars(expected)
    assert stamped.decision_id == decision_id and stamped is not decision
    assert vars(decision) == before  # the template is left as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        stamped.decision_id = "other"  # type: ignore[misc]


def test_exports() -> None:
    assert set(decision_module.__all__) == {
        "Decision",
        "HeaderOps",
        "Reason",
        "ShadowResult",
        "TraceEntry",
        "value_builder",
        "with_decision_id",
    }

"""A decision is a value: allow or deny, why, and the trace of how the engine got there."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from mypy_extensions import mypyc_attr

from authz.request import EMPTY_MAP

__all__ = [
    "Decision",
    "HeaderOps",
    "Reason",
    "ShadowResult",
    "TraceEntry",
    "value_builder",
    "with_decision_id",
]

# This module is compiled (authz.native), for with_decision_id; its classes stay regular Python classes
# (native_class=False): a compiled frozen dataclass is built by its generated __init__ storing each native
# attribute through object.__setattr__, slower than value_builder, and Decision keeps the instance dict
# that with_decision_id copies.
T = TypeVar("T")
_UNSET: Any = object()
_SET = object.__setattr__  # what a frozen dataclass's own __init__ uses to store a field
_NEW = object.__new__


def value_builder(cls: type[T]) -> Callable[..., T]:
    """A keyword-only constructor for the frozen dataclass ``cls``, for the few values built on every
    check (the request, the decision).

    A frozen dataclass's ``__init__`` stores each field through ``object.__setattr__``, a generic
    attribute look-up per field; this one calls each slot's descriptor directly (a slotted class), which
    halves the cost, or sets the instance dict in one call (a class without slots). It builds the same
    value: same fields, same defaults (factories called per value), no ``__post_init__`` (a class with
    one is refused, as is a class that is not frozen).
    """
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} is not a frozen dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__")
    if "__mypyc_attrs__" in cls.__dict__:
        return cls  # compiled with mypyc (authz.native): its own constructor is the fast one
    slotted = "__slots__" in cls.__dict__
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_UNSET": _UNSET, "_set": _SET}
    params: list[str] = []
    body: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            raise TypeError(f"{cls.__name__}.{f.name} is not an __init__ field")
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_UNSET")
            body.append(f"    if {f.name} is _UNSET:\n        {f.name} = _factory_{f.name}()")
        else:
            params.append(f.name)
        if slotted:
            namespace[f"_set_{f.name}"] = getattr(cls, f.name).__set__
            body.append(f"    _set_{f.name}(value, {f.name})")
    if not slotted:
        items = ", ".join(f"{f.name!r}: {f.name}" for f in dataclasses.fields(cls))
        body.append(f"    _set(value, '__dict__', {{{items}}})")
    source = (
        f"def build(*, {', '.join(params)}):\n    value = _new(_cls)\n"
        + "\n".join(body)
        + "\n    return value\n"
    )
    # The source is made of the class's own field names (identifiers), as dataclasses makes __init__.
    exec(source, namespace)  # noqa: S102
    build: Callable[..., T] = namespace["build"]
    build.__qualname__ = build.__name__ = f"build_{cls.__name__}"
    build.__doc__ = f"Build a {cls.__name__} (see authz.decision.value_builder)."
    return build


@mypyc_attr(native_class=False)
class Reason:
    """Stable snake_case reason codes. Metrics labels and JSON bodies use these strings."""

    ALLOWED_NO_POLICY: Final = "allowed_no_policy"
    ALLOWED_BY_POLICY: Final = "allowed_by_policy"
    DENIED_BY_POLICY: Final = "denied_by_policy"  # a DENY rule matched
    NO_ALLOW_MATCH: Final = "no_allow_match"  # ALLOW policies exist, none matched
    INVALID_TOKEN: Final = "invalid_token"
    UNKNOWN_ISSUER: Final = "unknown_issuer"
    AUDIENCE_NOT_ALLOWED: Final = "audience_not_allowed"
    MALFORMED_REQUEST: Final = "malformed_request"
    INTERNAL_ERROR: Final = "internal_error"
    DEPENDENCY_UNAVAILABLE: Final = "dependency_unavailable"


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One step of an evaluation: a policy (and rule) the engine considered, and what decided it.

    ``clause`` names the first clause that failed (``from[0].source.principals``) or, when
    ``matched``, the rule that matched; ``detail`` says it in words for ``authz check``.
    """

    stage: str  # "authn" | "custom" | "audit" | "deny" | "allow"
    policy: str  # ns[<ns>]-policy[<name>] or the RequestAuthentication name
    rule: int | None
    matched: bool
    clause: str = ""
    detail: str = ""

    @property
    def policy_id(self) -> str:
        return self.policy if self.rule is None else f"{self.policy}-rule[{self.rule}]"


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class ShadowResult:
    """Outcome of the dry-run (``istio.io/dry-run``) policies: never enforced, only reported."""

    allowed: bool
    policy_id: str


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header changes to apply when a request is allowed."""

    set: tuple[tuple[str, str], ...] = ()
    append: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    response: tuple[tuple[str, str], ...] = ()


@mypyc_attr(native_class=False)
@dataclass(frozen=True)
class Decision:
    """The engine's answer. ``status`` is 200 for allow, 401/403 (or 400 for a malformed request) for deny.

    Not slotted, unlike the other values: every check's decision differs from an earlier one with the same
    outcome only by its ``decision_id``, and an instance dict lets :func:`with_decision_id` copy one in a
    single call instead of setting seventeen slots.
    """

    allowed: bool
    status: int
    reason: str
    message: str = ""
    policy_id: str = ""
    trace: tuple[TraceEntry, ...] = ()
    headers: HeaderOps = field(default_factory=HeaderOps)
    www_authenticate: str = ""
    principal: str = ""
    request_principal: str = ""
    claims: Mapping[str, Any] = field(default_factory=lambda: EMPTY_MAP)
    audit: bool = False
    audit_policy_id: str = ""
    shadow: ShadowResult | None = None
    decision_id: str = ""
    normalized_path: str = ""


def with_decision_id(decision: Decision, decision_id: str) -> Decision:
    """``dataclasses.replace(decision, decision_id=decision_id)``, for the engine's per-check copy of an
    outcome it decided before: one dict copy instead of seventeen fields stored one by one."""
    fields = decision.__dict__.copy()
    fields["decision_id"] = decision_id
    value: Decision = _NEW(Decision)
    _SET(value, "__dict__", fields)
    return value

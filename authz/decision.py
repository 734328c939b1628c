"""A decision is a value: allow or deny, why, and the trace of how the engine got there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from authz.request import EMPTY_MAP

__all__ = ["Decision", "HeaderOps", "Reason", "ShadowResult", "TraceEntry"]


class Reason:
    """Stable snake_case reason codes. Metrics labels and JSON bodies use these strings."""

    ALLOWED_NO_POLICY = "allowed_no_policy"
    ALLOWED_BY_POLICY = "allowed_by_policy"
    DENIED_BY_POLICY = "denied_by_policy"  # a DENY rule matched
    NO_ALLOW_MATCH = "no_allow_match"  # ALLOW policies exist, none matched
    INVALID_TOKEN = "invalid_token"
    UNKNOWN_ISSUER = "unknown_issuer"
    AUDIENCE_NOT_ALLOWED = "audience_not_allowed"
    MALFORMED_REQUEST = "malformed_request"
    INTERNAL_ERROR = "internal_error"
    DEPENDENCY_UNAVAILABLE = "dependency_unavailable"


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


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """Outcome of the dry-run (``istio.io/dry-run``) policies: never enforced, only reported."""

    allowed: bool
    policy_id: str


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header changes to apply when a request is allowed."""

    set: tuple[tuple[str, str], ...] = ()
    append: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    response: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's answer. ``status`` is 200 for allow, 401/403 (or 400 for a malformed request) for deny."""

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

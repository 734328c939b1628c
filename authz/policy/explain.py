"""Render a :class:`~authz.policy.evaluate.PolicyResult` in words (built only when asked for)."""

from __future__ import annotations

from authz.decision import Decision, Reason
from authz.policy.evaluate import PolicyResult

__all__ = ["explain", "explain_lines"]

_STAGE_WORDS = {
    "custom": "CUSTOM",
    "audit": "AUDIT",
    "deny": "DENY",
    "allow": "ALLOW",
    "dry-run-deny": "DENY (dry-run)",
    "dry-run-allow": "ALLOW (dry-run)",
}

_REASON_WORDS = {
    Reason.ALLOWED_NO_POLICY: "allowed: no ALLOW policy applies to the workload and no DENY rule matched",
    Reason.ALLOWED_BY_POLICY: "allowed by ALLOW rule {id}",
    Reason.DENIED_BY_POLICY: "denied by DENY rule {id}",
    Reason.NO_ALLOW_MATCH: "denied: ALLOW policies apply to the workload but none of their rules matched",
}


def explain_lines(result: PolicyResult | Decision) -> list[str]:
    """One line for the decision, one per trace entry, then audit and dry-run notes.

    Takes a policy result, or a whole engine :class:`Decision` (which may have been decided before
    policies, by authentication: then the status, reason code and message say why).
    """
    if result.reason in _REASON_WORDS:
        head = _REASON_WORDS[result.reason].format(id=result.policy_id)
    elif isinstance(result, Decision) and result.message:
        head = f"{result.reason}: {result.message}"
    else:
        head = result.reason
    verdict = "ALLOW" if result.allowed else "DENY"
    if isinstance(result, Decision) and not result.allowed:
        verdict += f" ({result.status})"
    lines = [f"{verdict}: {head}"]
    if result.normalized_path:
        lines.append(f"  path matched as {result.normalized_path!r}")
    for entry in result.trace:
        stage = _STAGE_WORDS.get(entry.stage, entry.stage)
        if entry.stage == "authn":
            lines.append(f"  authentication: {entry.detail}")
        elif entry.stage == "custom":
            lines.append(f"  {stage} {entry.policy}: {entry.clause}")
        elif entry.matched:
            lines.append(f"  {stage} {entry.policy_id}: matched")
        else:
            lines.append(f"  {stage} {entry.policy_id}: no match, {entry.clause} did not match")
    if result.audit:
        lines.append(f"  marked for audit by {result.audit_policy_id}")
    if result.shadow is not None:
        verdict = "allow" if result.shadow.allowed else "deny"
        via = f" ({result.shadow.policy_id})" if result.shadow.policy_id else ""
        lines.append(f"  dry-run policies would {verdict}{via}")
    return lines


def explain(result: PolicyResult | Decision) -> str:
    return "\n".join(explain_lines(result))

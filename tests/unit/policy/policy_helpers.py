"""Helpers shared by the policy tests: build policies from YAML and decide with both evaluators."""

from __future__ import annotations

import textwrap
from typing import Any

from authz.config import DEFAULT_MESH, MeshConfig
from authz.policy.compile import compile_policies
from authz.policy.evaluate import PolicyResult, evaluate
from authz.policy.model import AuthorizationPolicy, load_authorization_policies
from authz.policy.normalize import normalize_path
from authz.policy.reference import reference_evaluate
from authz.policy.requestfile import parse_request_file
from authz.resources import parse_documents


def policies_from(text: str) -> list[AuthorizationPolicy]:
    policies, _ = load_authorization_policies(parse_documents(textwrap.dedent(text), "t.yaml"))
    return policies


def decide_both(
    policies: list[AuthorizationPolicy], request: dict[str, Any], mesh: MeshConfig = DEFAULT_MESH
) -> PolicyResult:
    """Decide with the compiled evaluator and assert the reference evaluator agrees."""
    req, wl, auth = parse_request_file(request)
    path = normalize_path(req.http.path, mesh.path_normalization) if req.http is not None else ""
    got = evaluate(compile_policies(policies, mesh), req, wl, auth, path=path)
    ref = reference_evaluate(policies, mesh, req, wl, auth, path=path)
    assert (got.allowed, got.reason, got.policy_id, got.audit, got.audit_policy_id, got.shadow) == (
        ref.allowed,
        ref.reason,
        ref.policy_id,
        ref.audit,
        ref.audit_policy_id,
        ref.shadow,
    )
    return got

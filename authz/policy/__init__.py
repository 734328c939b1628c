"""Istio AuthorizationPolicy: load and validate, compile, evaluate, explain, test."""

from __future__ import annotations

from authz.policy.compile import CompiledPolicies, compile_policies
from authz.policy.evaluate import PolicyResult, evaluate
from authz.policy.model import (
    Action,
    AuthorizationPolicy,
    FieldMatch,
    PolicyWarning,
    Rule,
    load_authorization_policies,
)
from authz.policy.normalize import check_http_request, normalize_path

__all__ = [
    "Action",
    "AuthorizationPolicy",
    "CompiledPolicies",
    "FieldMatch",
    "PolicyResult",
    "PolicyWarning",
    "Rule",
    "check_http_request",
    "compile_policies",
    "evaluate",
    "load_authorization_policies",
    "normalize_path",
]

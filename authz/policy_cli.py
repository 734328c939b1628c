"""``authz check``, ``authz test`` and ``authz lint``: the policy engine from the command line.

``check`` runs the whole engine, as ``authz serve`` would decide the request: a token in the request
(``token:`` or an ``authorization`` header) is validated against the RequestAuthentications of the folder
(fetching the issuer's keys); ``claims:`` instead are taken as an already verified token and only the
AuthorizationPolicies are evaluated. ``lint`` validates every kind the authorizer loads.

Exit codes: ``check`` 0 allow / 1 deny / 2 bad input; ``test`` 0 all passed / 1 a case failed / 2 bad
input; ``lint`` 0 clean or warnings only / 1 errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from authz.authn import Authenticator, claim_headers
from authz.clock import system_clock
from authz.config import MeshConfig, load_mesh_config
from authz.decision import Decision
from authz.engine import Engine
from authz.errors import ConfigError, ConfigErrors
from authz.policy.evaluate import PolicyResult
from authz.policy.explain import explain
from authz.policy.requestfile import parse_request_file
from authz.policy.testing import UpstreamHeaders, decide, load_policy_tests, run_policy_tests
from authz.resources import Resource, load_resources
from authz.snapshot import Snapshot, build_snapshot

__all__ = ["parse_request_file", "register", "result_as_dict", "upstream_headers_for"]

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    check = subparsers.add_parser("check", help="decide one request as the authorizer would, and explain why")
    check.add_argument("--policies", type=Path, action="append", required=True, help="file or folder")
    check.add_argument(
        "--request", required=True, help="request description (YAML/JSON file, or - for stdin)"
    )
    check.add_argument("--mesh", type=Path, help="Istio MeshConfig YAML")
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.set_defaults(func=run_check)

    test = subparsers.add_parser("test", help="run AuthorizationPolicyTest cases that live beside policies")
    test.add_argument("dir", type=Path, nargs="+")
    test.add_argument("--mesh", type=Path)
    test.add_argument("-v", "--verbose", action="store_true", help="explain passing cases too")
    test.set_defaults(func=run_test)

    lint = subparsers.add_parser("lint", help="validate policy files (every kind) and report warnings")
    lint.add_argument("dir", type=Path, nargs="+")
    lint.add_argument("--mesh", type=Path)
    lint.set_defaults(func=run_lint)


def result_as_dict(result: PolicyResult | Decision) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if isinstance(result, Decision):
        extra = {
            "status": result.status,
            "message": result.message,
            "requestPrincipal": result.request_principal,
            "principal": result.principal,
        }
    return {
        **extra,
        "allowed": result.allowed,
        "reason": result.reason,
        "policyId": result.policy_id,
        "normalizedPath": result.normalized_path,
        "audit": result.audit,
        "auditPolicyId": result.audit_policy_id,
        "shadow": None
        if result.shadow is None
        else {"allowed": result.shadow.allowed, "policyId": result.shadow.policy_id},
        "trace": [
            {
                "stage": t.stage,
                "policy": t.policy,
                "rule": t.rule,
                "matched": t.matched,
                "clause": t.clause,
            }
            for t in result.trace
        ],
    }


def _print_errors(exc: ConfigError | ConfigErrors, out: TextIO) -> None:
    errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    for e in errors:
        print(f"error: {e}", file=out)


def _snapshot(roots: list[Path], mesh: MeshConfig) -> tuple[Snapshot, list[Resource]]:
    resources = load_resources(roots)
    return build_snapshot(resources, mesh, generation=1, loaded_at=system_clock()), resources


async def _decide_with_engine(snapshot: Snapshot, mesh: MeshConfig, data: Any) -> Decision:
    request, workload, _ = parse_request_file(data)
    authenticator = Authenticator(settings=snapshot.authn_settings, clock=system_clock)
    try:
        engine = Engine(snapshot, mesh=mesh, authenticator=authenticator)
        return await engine.check(request, workload)
    finally:
        await authenticator.close()


def upstream_headers_for(snapshot: Snapshot) -> UpstreamHeaders:
    """For a test case with verified ``claims``: the headers the workload's RequestAuthentications put
    upstream, from the first jwtRule whose issuer accepts the claims' ``iss`` (as the authenticator does)."""

    def headers(request_data: Mapping[str, Any]) -> Mapping[str, str]:
        _, workload, auth = parse_request_file(request_data)
        if auth is None:
            return {}
        payload = base64.urlsafe_b64encode(json.dumps(dict(auth.claims), separators=(",", ":")).encode())
        for rule in snapshot.jwt_rules_for(workload):
            if not rule.issuer or rule.issuer == auth.issuer:
                return claim_headers(rule, auth.claims, payload.rstrip(b"=").decode())
        return {}

    return headers


def run_check(args: argparse.Namespace) -> int:
    result: PolicyResult | Decision
    try:
        mesh = load_mesh_config(args.mesh)
        snapshot, _ = _snapshot(args.policies, mesh)
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        parse_request_file(data)  # report request errors before deciding
        if isinstance(data, dict) and data.get("claims") is not None:
            result = decide(snapshot.policies, data)  # claims given: the token counts as verified
        else:
            result = asyncio.run(_decide_with_engine(snapshot, mesh, data))
    except (ConfigError, ConfigErrors) as exc:
        _print_errors(exc, sys.stderr)
        return EXIT_USAGE
    except (OSError, yaml.YAMLError) as exc:
        print(f"error: cannot read request: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result_as_dict(result), indent=2))
    else:
        print(explain(result))
    return EXIT_ALLOW if result.allowed else EXIT_DENY


def run_test(args: argparse.Namespace) -> int:
    try:
        snapshot, resources = _snapshot(args.dir, load_mesh_config(args.mesh))
        compiled = snapshot.policies
        cases = load_policy_tests(resources)
    except (ConfigError, ConfigErrors) as exc:
        _print_errors(exc, sys.stderr)
        return EXIT_USAGE
    if not cases:
        print("no AuthorizationPolicyTest cases found", file=sys.stderr)
        return EXIT_USAGE
    report = run_policy_tests(compiled, cases, upstream_headers=upstream_headers_for(snapshot))
    print(report.format(verbose=args.verbose))
    return 0 if report.ok else 1


def run_lint(args: argparse.Namespace) -> int:
    try:
        mesh = load_mesh_config(args.mesh)
        snapshot, resources = _snapshot(args.dir, mesh)
        load_policy_tests(resources)
    except (ConfigError, ConfigErrors) as exc:
        _print_errors(exc, sys.stdout)
        return 1
    for w in snapshot.warnings:
        print(w)
    counts = snapshot.describe()["counts"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no policies"
    print(f"{kinds}, 0 errors, {len(snapshot.warnings)} warnings")
    return 0

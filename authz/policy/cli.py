"""``authz check``, ``authz test`` and ``authz lint``: the policy engine from the command line.

Exit codes: ``check`` 0 allow / 1 deny / 2 bad input; ``test`` 0 all passed / 1 a case failed / 2 bad
input; ``lint`` 0 clean or warnings only / 1 errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from authz.config import MeshConfig, load_mesh_config
from authz.errors import ConfigError, ConfigErrors
from authz.policy.compile import CompiledPolicies, compile_policies
from authz.policy.evaluate import PolicyResult
from authz.policy.explain import explain
from authz.policy.model import load_authorization_policies
from authz.policy.requestfile import parse_request_file
from authz.policy.testing import decide, load_policy_tests, run_policy_tests
from authz.resources import load_resources

__all__ = ["parse_request_file", "register", "result_as_dict"]

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    check = subparsers.add_parser("check", help="decide one request against AuthorizationPolicy files")
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

    lint = subparsers.add_parser("lint", help="validate AuthorizationPolicy files and report warnings")
    lint.add_argument("dir", type=Path, nargs="+")
    lint.add_argument("--mesh", type=Path)
    lint.set_defaults(func=run_lint)


def result_as_dict(result: PolicyResult) -> dict[str, Any]:
    return {
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


def _load(roots: list[Path], mesh_file: Path | None) -> tuple[CompiledPolicies, list[Any], MeshConfig]:
    mesh = load_mesh_config(mesh_file)
    resources = load_resources(roots)
    policies, _warnings = load_authorization_policies(resources)
    return compile_policies(policies, mesh), resources, mesh


def run_check(args: argparse.Namespace) -> int:
    try:
        compiled, _, _ = _load(args.policies, args.mesh)
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        parse_request_file(data)  # report request errors before deciding
        result = decide(compiled, data)
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
        compiled, resources, _ = _load(args.dir, args.mesh)
        cases = load_policy_tests(resources)
    except (ConfigError, ConfigErrors) as exc:
        _print_errors(exc, sys.stderr)
        return EXIT_USAGE
    if not cases:
        print("no AuthorizationPolicyTest cases found", file=sys.stderr)
        return EXIT_USAGE
    report = run_policy_tests(compiled, cases)
    print(report.format(verbose=args.verbose))
    return 0 if report.ok else 1


def run_lint(args: argparse.Namespace) -> int:
    try:
        load_mesh_config(args.mesh)
        resources = load_resources(args.dir)
        policies, warnings = load_authorization_policies(resources)
        load_policy_tests(resources)
    except (ConfigError, ConfigErrors) as exc:
        _print_errors(exc, sys.stdout)
        return 1
    for w in warnings:
        print(w)
    print(f"{len(policies)} AuthorizationPolicy, 0 errors, {len(warnings)} warnings")
    return 0

"""Policy test files that live beside the policies (our own kind) and a runner for them.

::

    apiVersion: meshauthz.dev/v1alpha1
    kind: AuthorizationPolicyTest
    metadata: {name: orders, namespace: orders}
    spec:
      workload: {namespace: orders, labels: {app: orders}}   # default for every case
      cases:
      - name: frontend may list orders
        request: {method: GET, path: /orders, source: {principal: spiffe://cluster.local/ns/web/sa/frontend}}
        expect: {allowed: true, policyId: "ns[orders]-policy[orders-read]-rule[0]"}
      - name: anyone else is denied
        request: {method: GET, path: /orders}
        expect: deny                                           # shorthand for {allowed: false}

``expect`` keys: ``allowed`` (required), ``policyId``, ``reason`` (``authz.decision.Reason`` codes, plus
``malformed_request``/``malformed_path`` for requests refused before evaluation), ``audit``, and
``headers``: the upstream headers an allowed request gets from its verified ``claims`` (the
RequestAuthentications' ``outputClaimToHeaders`` / ``outputPayloadToHeader``), a value of ``null`` meaning
"absent".
The request format is :mod:`authz.policy.requestfile`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from authz.errors import ConfigError, ConfigErrors, MalformedRequest
from authz.policy.compile import CompiledPolicies
from authz.policy.evaluate import PolicyResult, evaluate
from authz.policy.explain import explain_lines
from authz.policy.normalize import check_http_request, normalize_path
from authz.policy.requestfile import parse_request_file
from authz.resources import Resource

__all__ = [
    "TEST_API_VERSION",
    "TEST_KIND",
    "CaseResult",
    "PolicyTestCase",
    "TestReport",
    "decide",
    "load_policy_tests",
    "run_policy_tests",
]

TEST_API_VERSION = "meshauthz.dev/v1alpha1"
TEST_KIND = "AuthorizationPolicyTest"


@dataclass(frozen=True, slots=True)
class Expectation:
    allowed: bool
    policy_id: str | None = None
    reason: str | None = None
    audit: bool | None = None
    headers: Mapping[str, str | None] | None = None


UpstreamHeaders = Callable[[Mapping[str, Any]], Mapping[str, str]]
"""Given a case's request description, the headers its verified claims put on the upstream request."""


@dataclass(frozen=True, slots=True)
class PolicyTestCase:
    suite: str
    name: str
    file: str
    line: int
    request: Mapping[str, Any]
    expect: Expectation


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: PolicyTestCase
    passed: bool
    result: PolicyResult
    problems: tuple[str, ...] = ()


@dataclass(slots=True)
class TestReport:
    """What a test run found; ``ok`` is true when every case passed."""

    results: list[CaseResult] = field(default_factory=list)

    __test__ = False  # not a pytest class

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def format(self, *, verbose: bool = False) -> str:
        lines: list[str] = []
        for r in self.results:
            c = r.case
            status = "PASS" if r.passed else "FAIL"
            lines.append(f"{status} {c.file}:{c.line} {c.suite} / {c.name}")
            if not r.passed:
                lines.extend(f"     {p}" for p in r.problems)
            if not r.passed or verbose:
                lines.extend(f"     {x}" for x in explain_lines(r.result))
        passed = sum(r.passed for r in self.results)
        lines.append(f"{passed} passed, {len(self.results) - passed} failed")
        return "\n".join(lines)


def _parse_expect(resource: Resource, raw: Any, path: tuple[str | int, ...]) -> Expectation:
    if raw in ("allow", "deny"):
        return Expectation(allowed=raw == "allow")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("allowed"), bool):
        raise resource.error(path, "expect must be allow, deny or a mapping with allowed: true|false")
    unknown = set(raw) - {"allowed", "policyId", "reason", "audit", "headers"}
    if unknown:
        raise resource.error(
            path, f"unknown field(s) {sorted(unknown)} (allowed, policyId, reason, audit, headers)"
        )
    headers = raw.get("headers")
    if headers is not None and (
        not isinstance(headers, Mapping)
        or not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in headers.items())
    ):
        raise resource.error((*path, "headers"), "must map header names to strings (or null: absent)")
    policy_id = raw.get("policyId")
    reason = raw.get("reason")
    audit = raw.get("audit")
    if policy_id is not None and not isinstance(policy_id, str):
        raise resource.error((*path, "policyId"), "must be a string")
    if reason is not None and not isinstance(reason, str):
        raise resource.error((*path, "reason"), "must be a string")
    if audit is not None and not isinstance(audit, bool):
        raise resource.error((*path, "audit"), "must be true or false")
    return Expectation(
        allowed=raw["allowed"],
        policy_id=policy_id,
        reason=reason,
        audit=audit,
        headers={k.lower(): v for k, v in headers.items()} if headers is not None else None,
    )


def load_policy_tests(resources: Sequence[Resource]) -> list[PolicyTestCase]:
    """Test cases of every ``AuthorizationPolicyTest`` in ``resources``. Raises :class:`ConfigErrors`."""
    errors: list[ConfigError] = []
    cases: list[PolicyTestCase] = []
    for r in resources:
        if r.kind != TEST_KIND:
            continue
        try:
            if r.api_version != TEST_API_VERSION:
                raise r.error(("apiVersion",), f"want {TEST_API_VERSION}")
            spec = r.spec
            if not isinstance(spec, Mapping) or not isinstance(spec.get("cases"), list):
                raise r.error(("spec",), "spec.cases must be a list")
            default_wl = spec.get("workload")
            for i, raw in enumerate(spec["cases"]):
                path: tuple[str | int, ...] = ("spec", "cases", i)
                if not isinstance(raw, Mapping) or not isinstance(raw.get("request"), Mapping):
                    raise r.error(path, "a case needs a request mapping")
                request = dict(raw["request"])
                if default_wl is not None and "workload" not in request and "namespace" not in request:
                    request["workload"] = default_wl
                try:
                    parse_request_file(request)
                except ConfigError as exc:
                    raise r.error((*path, "request", exc.field), exc.message) from None
                cases.append(
                    PolicyTestCase(
                        suite=f"{r.namespace}/{r.name}",
                        name=str(raw.get("name", f"case {i}")),
                        file=r.file,
                        line=r.line_of(path),
                        request=request,
                        expect=_parse_expect(r, raw.get("expect"), (*path, "expect")),
                    )
                )
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise ConfigErrors(errors)
    return cases


def decide(compiled: CompiledPolicies, request_data: Mapping[str, Any]) -> PolicyResult:
    """Parse a request description, normalize its path per the mesh config, and evaluate it.
    A malformed request is a deny with the error's reason (no exception)."""
    request, workload, auth = parse_request_file(request_data)
    path = ""
    try:
        if request.http is not None:
            check_http_request(request.http)
            path = normalize_path(request.http.path, compiled.mesh.path_normalization)
    except MalformedRequest as exc:
        return PolicyResult(allowed=False, reason=exc.reason, policy_id="", normalized_path="")
    return evaluate(compiled, request, workload, auth, path=path)


def run_policy_tests(
    compiled: CompiledPolicies,
    cases: Sequence[PolicyTestCase],
    *,
    upstream_headers: UpstreamHeaders | None = None,
) -> TestReport:
    """Decide every case and compare with its expectation. ``upstream_headers`` computes the headers an
    allowed request's claims produce (the caller knows the RequestAuthentications); without it, a case
    that expects headers fails with a clear message."""
    report = TestReport()
    for case in cases:
        result = decide(compiled, case.request)
        e = case.expect
        problems: list[str] = []
        if result.allowed != e.allowed:
            problems.append(
                f"expected {'allow' if e.allowed else 'deny'}, got {'allow' if result.allowed else 'deny'}"
            )
        if e.policy_id is not None and result.policy_id != e.policy_id:
            problems.append(f"expected policy id {e.policy_id!r}, got {result.policy_id!r}")
        if e.reason is not None and result.reason != e.reason:
            problems.append(f"expected reason {e.reason!r}, got {result.reason!r}")
        if e.audit is not None and result.audit != e.audit:
            problems.append(f"expected audit={e.audit}, got audit={result.audit}")
        if e.headers is not None:
            problems.extend(_header_problems(e.headers, result, case.request, upstream_headers))
        report.results.append(
            CaseResult(case=case, passed=not problems, result=result, problems=tuple(problems))
        )
    return report


def _header_problems(
    want: Mapping[str, str | None],
    result: PolicyResult,
    request: Mapping[str, Any],
    upstream_headers: UpstreamHeaders | None,
) -> list[str]:
    if upstream_headers is None:
        return ["expects headers, but this runner does not know the RequestAuthentications"]
    got = {k.lower(): v for k, v in upstream_headers(request).items()} if result.allowed else {}
    problems = []
    for name, value in want.items():
        if got.get(name) != value:
            shown = "absent" if value is None else repr(value)
            problems.append(f"expected header {name} {shown}, got {got.get(name, 'absent')!r}")
    return problems

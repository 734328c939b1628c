"""In-process micro benchmarks: policy evaluation alone and JWT verification alone.

The engine's packages are imported lazily, inside each benchmark: while one of them is missing or its
API differs, that benchmark reports ``skipped: <reason>`` and the rest of the run goes on. Expected APIs:
``authz.resources.parse_documents(yaml_text)``,
``authz.policy.load_authorization_policies(resources) -> (policies, warnings)``,
``authz.policy.compile_policies(policies, mesh) -> compiled``,
``authz.policy.evaluate(compiled, request, workload, auth, *, path=...) -> result``,
``authz.authn.jwt.verify(token, keys, *, now, rule, settings)`` and
``authz.authn.authenticator.Authenticator.authenticate(request, rules)`` (the cached path).

Each case times single calls with ``perf_counter_ns`` (about 0.1 µs of overhead), bounded both in
iterations and in wall time, and reports p50 and p99 per call.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import yaml

from bench.tokens import BENCH_ISSUER, bench_claims, mint_key, mint_token, public_jwks

__all__ = [
    "POLICY_RULE_COUNTS",
    "bench_jwt",
    "bench_policy",
    "percentile",
    "policy_yaml",
    "run_micro",
    "time_calls",
    "time_calls_async",
]

POLICY_RULE_COUNTS = (10, 1_000, 10_000)
RULES_PER_POLICY = 100  # well under the CRD's 512-rule limit per policy (istio crd-all.gen.yaml)
JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
DEFAULT_BUDGET_S = 0.5
DEFAULT_MAX_ITERATIONS = 20_000
WARMUP_CALLS = 10  # fills caches (regex, attribute look-ups) before timing
DISTINCT_COLD_TOKENS = 64  # verification cost does not depend on the token; distinct ones defeat any memo


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending list; raises on an empty list."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _summary(case: str, samples_ns: list[int]) -> dict[str, Any]:
    us = sorted(s / 1e3 for s in samples_ns)
    return {"case": case, "p50_us": percentile(us, 50), "p99_us": percentile(us, 99), "iterations": len(us)}


def time_calls(
    case: str,
    call: Callable[[], object],
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> dict[str, Any]:
    """Call ``call`` until ``max_iterations`` or ``budget_s`` (after up to ``WARMUP_CALLS`` untimed calls,
    themselves bounded by a fifth of the budget). At least one call is always timed."""
    warm_until = time.perf_counter() + budget_s / 5
    for _ in range(WARMUP_CALLS):
        call()
        if time.perf_counter() > warm_until:
            break
    samples: list[int] = []
    deadline = time.perf_counter() + budget_s
    clock = time.perf_counter_ns
    while len(samples) < max_iterations and time.perf_counter() < deadline:
        start = clock()
        call()
        samples.append(clock() - start)
    return _summary(case, samples)


async def time_calls_async(
    case: str,
    call: Callable[[], Awaitable[object]],
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> dict[str, Any]:
    """:func:`time_calls` for a coroutine function, awaited inside one running loop."""
    warm_until = time.perf_counter() + budget_s / 5
    for _ in range(WARMUP_CALLS):
        await call()
        if time.perf_counter() > warm_until:
            break
    samples: list[int] = []
    deadline = time.perf_counter() + budget_s
    clock = time.perf_counter_ns
    while len(samples) < max_iterations and time.perf_counter() < deadline:
        start = clock()
        await call()
        samples.append(clock() - start)
    return _summary(case, samples)


def _skipped(case: str, exc: BaseException) -> dict[str, Any]:
    return {"case": case, "skipped": f"{type(exc).__name__}: {exc}"[:200]}


def policy_yaml(rule_count: int, *, namespace: str = "default") -> str:
    """``rule_count`` ALLOW rules spread over policies of ``RULES_PER_POLICY`` rules each; rule ``i``
    allows GET ``/api/r<i>/*`` for request principal ``<issuer>/user-<i>`` with ``groups`` containing
    ``g<i % 10>``: every rule differs, so no index can answer for all of them at once."""
    docs = []
    for first in range(0, rule_count, RULES_PER_POLICY):
        rules = [
            {
                "from": [{"source": {"requestPrincipals": [f"{BENCH_ISSUER}/user-{i}"]}}],
                "to": [{"operation": {"methods": ["GET"], "paths": [f"/api/r{i}/*"]}}],
                "when": [{"key": "request.auth.claims[groups]", "values": [f"g{i % 10}"]}],
            }
            for i in range(first, min(first + RULES_PER_POLICY, rule_count))
        ]
        docs.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": f"bench-{first // RULES_PER_POLICY}", "namespace": namespace},
                "spec": {"selector": {"matchLabels": {"app": "bench"}}, "action": "ALLOW", "rules": rules},
            }
        )
    # libyaml's emitter when present: the pure-Python one takes seconds for 10,000 rules.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump_all(docs, Dumper=dumper, sort_keys=False)


def _policy_cases(n: int, budget_s: float) -> list[dict[str, Any]]:
    from authz.config import DEFAULT_MESH
    from authz.policy import compile_policies, evaluate, load_authorization_policies
    from authz.request import HttpAttributes, Peer, Request, RequestAuth, Workload
    from authz.resources import parse_documents

    policies, _warnings = load_authorization_policies(parse_documents(policy_yaml(n)))
    compiled = compile_policies(policies, DEFAULT_MESH)
    workload = Workload(namespace="default", labels={"app": "bench"})
    last = n - 1
    path = f"/api/r{last}/items"
    request = Request(
        source=Peer(address="127.0.0.1", port=40000),
        destination=Peer(address="127.0.0.1", port=8080),
        http=HttpAttributes(method="GET", host="bench", path=path, headers={":path": path}),
    )
    allowed = RequestAuth(claims={"iss": BENCH_ISSUER, "sub": f"user-{last}", "groups": [f"g{last % 10}"]})
    stranger = RequestAuth(claims={"iss": BENCH_ISSUER, "sub": "nobody", "groups": ["none"]})
    allow_ok = evaluate(compiled, request, workload, allowed, path=path).allowed
    deny_ok = not evaluate(compiled, request, workload, stranger, path=path).allowed
    if not (allow_ok and deny_ok):
        raise RuntimeError(
            f"unexpected decisions (last rule allowed: {allow_ok}, stranger denied: {deny_ok})"
        )
    memo = compiled.plan_for(workload).memo

    def first_sight(auth: RequestAuth) -> None:
        """Evaluate as for a request never seen: the plan's remembered outcomes are dropped first."""
        memo.clear()
        evaluate(compiled, request, workload, auth, path=path)

    cases = []
    for label, auth in (("last rule allows", allowed), ("no rule matches", stranger)):
        cases.append(
            time_calls(
                f"policy evaluation, {n:,} rules, {label}",
                functools.partial(first_sight, auth),
                budget_s=budget_s,
            )
        )
        cases.append(
            time_calls(
                f"policy evaluation, {n:,} rules, {label}, remembered",
                functools.partial(evaluate, compiled, request, workload, auth, path=path),
                budget_s=budget_s,
            )
        )
    return cases


def bench_policy(
    rule_counts: tuple[int, ...] = POLICY_RULE_COUNTS, *, budget_s: float = DEFAULT_BUDGET_S
) -> list[dict[str, Any]]:
    """p50 per decision for each rule count: the last rule matches (allow) and no rule matches (deny)."""
    out: list[dict[str, Any]] = []
    for n in rule_counts:
        try:
            out.extend(_policy_cases(n, budget_s))
        except Exception as exc:  # an engine still being built (ImportError, API drift) must not stop us
            out.append(_skipped(f"policy evaluation, {n:,} rules", exc))
    return out


def _cycle(items: list[str]) -> Iterator[str]:
    while True:
        yield from items


async def _jwt_cases(alg: str, budget_s: float) -> list[dict[str, Any]]:
    from authz.authn.authenticator import Authenticator
    from authz.authn.jwk import parse_jwks
    from authz.authn.jwt import verify
    from authz.authn.model import JwtRule
    from authz.authn.settings import AuthnSettings, IssuerSettings
    from authz.request import HttpAttributes, Request

    key = mint_key(alg)
    jwks = public_jwks(key)
    keys = parse_jwks(jwks, source="bench").keys
    now = time.time()
    tokens = [mint_token(key, bench_claims(now, serial=i)) for i in range(DISTINCT_COLD_TOKENS)]
    rule = JwtRule(issuer=BENCH_ISSUER, jwks=jwks)
    settings = IssuerSettings(issuer=BENCH_ISSUER)
    rotation = _cycle(tokens)
    cold = time_calls(
        f"JWT {alg} verify (cold: signature + claims)",
        lambda: verify(next(rotation), keys, now=now, rule=rule, settings=settings),
        budget_s=budget_s,
    )
    authenticator = Authenticator(settings=AuthnSettings(), clock=time.time)
    request = Request(
        http=HttpAttributes(path="/api/items", headers={"authorization": f"Bearer {tokens[0]}"})
    )
    rules = (rule,)
    try:
        first = await authenticator.authenticate(request, rules)
        if not first.ok:
            raise RuntimeError(f"the authenticator rejected the bench token: {first.error}")
        cached = await time_calls_async(
            f"JWT {alg} authenticate (cached: token seen before)",
            lambda: authenticator.authenticate(request, rules),
            budget_s=budget_s,
        )
    finally:
        await authenticator.close()
    return [cold, cached]


def bench_jwt(
    algorithms: tuple[str, ...] = JWT_ALGORITHMS, *, budget_s: float = DEFAULT_BUDGET_S
) -> list[dict[str, Any]]:
    """Per algorithm: a full signature + claims verification (cold) and the authenticator's hot path
    (token extraction, cache hit, identity) with a token it has verified before (cached)."""
    out: list[dict[str, Any]] = []
    for alg in algorithms:
        try:
            out.extend(asyncio.run(_jwt_cases(alg, budget_s)))
        except Exception as exc:  # an engine still being built (ImportError, API drift) must not stop us
            out.append(_skipped(f"JWT {alg}", exc))
    return out


def run_micro(
    *, budget_s: float = DEFAULT_BUDGET_S, rule_counts: tuple[int, ...] = POLICY_RULE_COUNTS
) -> dict[str, Any]:
    return {
        "policy": bench_policy(rule_counts, budget_s=budget_s),
        "jwt": bench_jwt(budget_s=budget_s),
    }

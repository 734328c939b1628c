"""``authz demo``: the story, step by step, against a mesh started by ``authz run``.

Each step makes real requests and returns a :class:`StepResult` saying whether the mesh behaved as the
story says; :func:`run_story` prints them. The integration test calls the same steps and asserts on them.

The story: no token (403), a bad token (401), a token (200, identity headers), the wrong workload (403),
``authz check`` explains it; then the canary through the frontend's bundled-proxy sidecar: the observed
v1/v2 split matches the VirtualService's 90/10, every request is mirrored to the shadow, editing the file
to 50/50 hot-reloads the proxy and the split follows; last, a key rotation at the IdP under load.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import ssl
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from authz.errors import DependencyError
from authz.launcher.mesh import (
    INITIAL_CANARY_WEIGHTS,
    MeshState,
    canary_virtual_service_text,
    canary_weights,
    spiffe_id,
)

__all__ = [
    "CANARY_REQUESTS",
    "MOVED_CANARY_WEIGHTS",
    "ROTATION_REQUESTS",
    "SplitObservation",
    "StepResult",
    "app_stats",
    "call_frontend",
    "explain_denial",
    "fetch_token",
    "observe_split",
    "proxy_reloads",
    "rotate_keys_under_load",
    "run_story",
    "set_canary_weights",
    "split_tolerance",
    "step_bad_token",
    "step_canary_split",
    "step_hot_reload",
    "step_mirror",
    "step_no_token",
    "step_with_token",
    "step_wrong_identity",
    "token_kid",
]

REQUEST_TIMEOUT = 10.0  # seconds per demo request: the mesh answers in milliseconds; this bounds a hang
ROTATION_REQUESTS = 60  # requests sent while the IdP rotates its signing key
ROTATION_WORKERS = 4
# The retired key stays in the JWKS this long, so tokens signed before the rotation keep verifying.
ROTATION_RETIRE_AFTER_SECONDS = 600
CHECK_TIMEOUT = 30.0
CANARY_REQUESTS = 200  # per observed split: 4 standard deviations are then +-8.5 points at 90/10
CANARY_WORKERS = 4  # concurrent requests while observing a split (the proxy picks per request)
MOVED_CANARY_WEIGHTS = (50, 50)  # where the demo moves the canary to
SPLIT_SIGMAS = 4.0  # tolerance of an observed share: a binomial share this far off happens < 1 in 10^4
# The proxy notices the edit (inotify, 200 ms debounce) and swaps its routes in well under a second;
# a loaded 2-core machine may take a few.
RELOAD_TIMEOUT = 15.0
MIRROR_SETTLE_TIMEOUT = 10.0  # mirrored copies are fire-and-forget: they may land after the primaries
POLL_INTERVAL = 0.1


@dataclass(frozen=True)
class StepResult:
    name: str
    ok: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def fetch_token(state: MeshState, *, client: httpx.Client | None = None) -> str:
    """An access token for the demo client: RFC 6749 section 4.4 client_credentials, client_secret_basic."""
    own = client is None
    http = client or httpx.Client(timeout=REQUEST_TIMEOUT, trust_env=False)
    try:
        reply = http.post(
            state.token_url,
            data={"grant_type": "client_credentials"},
            auth=(state.client_id, state.client_secret),
        )
    except httpx.HTTPError as exc:
        raise DependencyError(f"the IdP at {state.token_url} is unreachable: {exc}") from exc
    finally:
        if own:
            http.close()
    if reply.status_code != 200:
        raise DependencyError(f"the IdP refused a token: HTTP {reply.status_code} {reply.text[:200]}")
    token: str = reply.json()["access_token"]
    return token


def token_kid(token: str) -> str:
    """The ``kid`` of a compact JWS's protected header (RFC 7515 section 4.1.4); ``""`` if none."""
    head = token.split(".", 1)[0]
    data = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return str(data.get("kid", ""))


def call_frontend(
    state: MeshState, token: str | None, *, client: httpx.Client, path: str = "/orders"
) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return client.get(state.frontend_url + path, headers=headers)


def _body(reply: httpx.Response) -> dict[str, Any]:
    try:
        data = reply.json()
    except ValueError:
        return {"text": reply.text[:300]}
    return data if isinstance(data, dict) else {"value": data}


def step_no_token(state: MeshState, client: httpx.Client) -> StepResult:
    """No token: authentication passes with no request principal, the ALLOW rule needs one: 403."""
    reply = call_frontend(state, None, client=client)
    orders = _body(reply).get("orders", {})
    ok = reply.status_code == 403
    return StepResult(
        "no token is refused",
        ok,
        f"GET /orders without a token -> {reply.status_code} ({orders.get('reason', '?')})",
        {"status": reply.status_code, "orders": orders},
    )


def step_bad_token(state: MeshState, client: httpx.Client) -> StepResult:
    """A malformed token: 401 with ``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750 3.1)."""
    reply = call_frontend(state, "not-a-jwt", client=client)
    challenge = reply.headers.get("www-authenticate", "")
    ok = reply.status_code == 401 and challenge.startswith("Bearer")
    return StepResult(
        "a bad token is refused",
        ok,
        f"GET /orders with a malformed token -> {reply.status_code}, "
        f"WWW-Authenticate: {challenge or '(none)'}",
        {"status": reply.status_code, "www_authenticate": challenge},
    )


def step_with_token(state: MeshState, client: httpx.Client, token: str) -> StepResult:
    """A token from the IdP: 200; orders sees ``x-jwt-sub``, not the token (Istio ``forwardOriginalToken``
    defaults to false). Behind either sidecar it also sees the caller's SPIFFE ID in XFCC: Envoy (v1) and
    the bundled proxy (v2) both run ``forward_client_cert_details: SANITIZE_SET`` with Subject, URI and DNS
    set, as istiod configures sidecar inbound listeners."""
    reply = call_frontend(state, token, client=client)
    orders = _body(reply).get("orders", {})
    identity = orders.get("identity", {}) if isinstance(orders, dict) else {}
    xfcc = identity.get("x-forwarded-client-cert", "")
    version = orders.get("version", "?") if isinstance(orders, dict) else "?"
    ok = (
        reply.status_code == 200
        and identity.get("x-jwt-sub") == state.client_id
        and spiffe_id("frontend") in xfcc
        and orders.get("authorization_forwarded") is False
    )
    caller = f"caller {spiffe_id('frontend')} ({'in' if spiffe_id('frontend') in xfcc else 'NOT in'} XFCC)"
    return StepResult(
        "a token from the IdP lets it through",
        ok,
        f"GET /orders with a token -> {reply.status_code}; orders {version} saw "
        f"x-jwt-sub={identity.get('x-jwt-sub', '(missing)')}, {caller}, token "
        f"{'forwarded' if orders.get('authorization_forwarded') else 'stripped'}",
        {"status": reply.status_code, "identity": identity, "orders": orders, "version": version},
    )


def _mtls_client(svid: Path) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(svid / "bundle.pem"))
    ctx.check_hostname = False  # SVIDs name a SPIFFE ID (URI SAN), not a host (SPIFFE X509-SVID section 2)
    ctx.load_cert_chain(str(svid / "chain.pem"), str(svid / "key.pem"))
    return httpx.Client(verify=ctx, timeout=REQUEST_TIMEOUT, trust_env=False)


def step_wrong_identity(state: MeshState, token: str) -> StepResult:
    """Another workload (a valid SVID of the same trust domain, a valid token) calls orders directly:
    the ALLOW rule's ``principals`` names only the frontend: 403, with the decision id to look up."""
    with _mtls_client(Path(state.svids["intruder"])) as client:
        reply = client.get(state.orders_url + "/orders", headers={"authorization": f"Bearer {token}"})
    body = _body(reply)
    decision_id = reply.headers.get("x-authz-decision-id", "")
    ok = reply.status_code == 403
    return StepResult(
        "the wrong workload identity is refused",
        ok,
        f"{spiffe_id('intruder')} with a valid token -> {reply.status_code} "
        f"({body.get('reason', '?')}, decision {decision_id or '?'})",
        {"status": reply.status_code, "decision_id": decision_id, "body": body},
    )


def explain_denial(state: MeshState) -> StepResult:
    """``authz check`` explains the denial of the previous step from the policy files alone."""
    request = {
        "method": "GET",
        "path": "/orders",
        "source": {"principal": spiffe_id("intruder")},
        "workload": {"namespace": "orders", "labels": {"app": "orders", "version": "v1"}},
        "claims": {"iss": state.issuer_url, "sub": state.client_id},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(request, handle)
        request_file = handle.name
    policies = str(Path(state.run_dir) / "policies")
    argv = [*state.authz_command, "check", "--policies", policies, "--request", request_file]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return StepResult(
            "authz check explains it", False, f"authz check gave no answer in {CHECK_TIMEOUT:.0f}s"
        )
    finally:
        Path(request_file).unlink(missing_ok=True)
    if "invalid choice" in done.stderr:
        return StepResult("authz check explains it", True, "authz check is not available yet", skipped=True)
    text = done.stdout.strip()
    ok = done.returncode == 1 and "principals" in text
    return StepResult(
        "authz check explains it",
        ok,
        "authz check --policies .run/policies --request <the intruder's request>:\n    "
        + "\n    ".join(text.splitlines()[:8]),
        {"exit_code": done.returncode, "output": text},
    )


def rotate_keys_under_load(state: MeshState, *, requests: int = ROTATION_REQUESTS) -> StepResult:
    """Requests keep flowing (fresh tokens too) while the IdP rotates its signing key: none may fail.

    The old key stays published (retiring) so tokens already issued verify; the first token signed by the
    new key names a ``kid`` the authorizer's cached JWKS lacks, which makes it refetch the JWKS at once.
    """
    statuses: list[int] = []
    with httpx.Client(timeout=REQUEST_TIMEOUT, trust_env=False) as client:
        old_token = fetch_token(state, client=client)
        old_kid = token_kid(old_token)

        def one(token: str) -> int:
            try:
                return call_frontend(state, token, client=client).status_code
            except httpx.HTTPError:
                return 0

        half = requests // 2
        with ThreadPoolExecutor(ROTATION_WORKERS) as pool:
            statuses += pool.map(one, [old_token] * half)
            rotated = client.post(
                f"{state.issuer_url}/admin/keys/rotate",
                json={"retire_after_seconds": ROTATION_RETIRE_AFTER_SECONDS},
            )
            new_token = fetch_token(state, client=client)
            # Old tokens in flight and new ones, interleaved: both must pass.
            statuses += pool.map(one, [new_token if i % 2 else old_token for i in range(requests - half)])
    new_kid = token_kid(new_token)
    failures = sum(1 for s in statuses if s != 200)
    ok = rotated.status_code == 200 and new_kid != old_kid and failures == 0
    return StepResult(
        "key rotation at the IdP fails no request",
        ok,
        f"rotated {old_kid} -> {new_kid} (HTTP {rotated.status_code}) during {len(statuses)} requests: "
        f"{failures} failed",
        {"old_kid": old_kid, "new_kid": new_kid, "statuses": statuses, "failures": failures},
    )


def split_tolerance(expected_share: float, requests: int) -> float:
    """How far an observed share may sit from ``expected_share`` over ``requests`` independent weighted
    picks: ``SPLIT_SIGMAS`` binomial standard deviations, sqrt(p(1-p)/n)."""
    return SPLIT_SIGMAS * math.sqrt(expected_share * (1 - expected_share) / max(requests, 1))


@dataclass(frozen=True)
class SplitObservation:
    """What ``requests`` calls through the frontend saw: orders versions, statuses, who answered."""

    requests: int
    versions: dict[str, int]
    statuses: dict[int, int]
    services: dict[str, int]

    def share(self, version: str) -> float:
        return self.versions.get(version, 0) / self.requests if self.requests else 0.0

    @property
    def all_ok(self) -> bool:
        """Every reply a 200 from an orders app (v1 or v2), none from anything else (the shadow's replies
        are discarded by the proxy and must never reach a caller)."""
        return (
            self.statuses.get(200, 0) == self.requests
            and self.services.get("orders", 0) == self.requests
            and sum(self.versions.get(v, 0) for v in ("v1", "v2")) == self.requests
        )


def observe_split(state: MeshState, token: str, *, requests: int, client: httpx.Client) -> SplitObservation:
    """Send ``requests`` GET /orders through the frontend (``CANARY_WORKERS`` at a time); count the orders
    version that answered each."""

    def one(_: int) -> tuple[int, str, str]:
        try:
            reply = call_frontend(state, token, client=client)
        except httpx.HTTPError:
            return 0, "", ""
        orders = _body(reply).get("orders", {})
        if not isinstance(orders, dict):
            return reply.status_code, "", ""
        return reply.status_code, str(orders.get("service", "")), str(orders.get("version", ""))

    with ThreadPoolExecutor(CANARY_WORKERS) as pool:
        replies = list(pool.map(one, range(requests)))
    return SplitObservation(
        requests,
        dict(Counter(v for _, _, v in replies if v)),
        dict(Counter(s for s, _, _ in replies)),
        dict(Counter(svc for _, svc, _ in replies if svc)),
    )


def app_stats(url: str, client: httpx.Client) -> dict[str, int]:
    """A demo app's request counts by Host kind (``primary``, ``shadow``: Host ending in ``-shadow``)."""
    reply = client.get(f"{url}/_stats")
    reply.raise_for_status()
    counts = reply.json().get("requests", {})
    return {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}


_RELOADS = re.compile(r'^meshauthz_proxy_config_reloads_total\{result="(\w+)"\} ([0-9.e+]+)$', re.MULTILINE)


def proxy_reloads(admin_url: str, client: httpx.Client) -> dict[str, int]:
    """The bundled proxy's configuration reloads so far, by result (``ok``, ``error``), from ``/metrics``."""
    reply = client.get(f"{admin_url}/metrics")
    reply.raise_for_status()
    return {m.group(1): int(float(m.group(2))) for m in _RELOADS.finditer(reply.text)}


def set_canary_weights(
    state: MeshState, v1: int, v2: int, *, client: httpx.Client, timeout: float = RELOAD_TIMEOUT
) -> float:
    """Rewrite the canary VirtualService with weights ``v1``/``v2`` and wait until the frontend's proxy has
    reloaded it; returns the seconds that took. Raises :class:`DependencyError` if the proxy rejected the
    file or did not reload within ``timeout``.

    The new text is written beside the run dir's files and renamed into the watched folder (rename(2) is
    atomic), so the proxy never reads a half-written file.
    """
    target = Path(state.canary_file)
    before = proxy_reloads(state.frontend_proxy_admin_url, client)
    staging = Path(state.run_dir) / f".{target.name}.new"
    staging.write_text(canary_virtual_service_text(v1, v2), encoding="utf-8")
    started = time.monotonic()
    os.replace(staging, target)
    deadline = started + timeout
    while True:
        now = proxy_reloads(state.frontend_proxy_admin_url, client)
        if now.get("error", 0) > before.get("error", 0):
            raise DependencyError(
                f"the frontend's proxy rejected {target}; its log (logs/proxy-frontend.log) says why"
            )
        if now.get("ok", 0) > before.get("ok", 0):
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise DependencyError(f"the frontend's proxy did not reload {target} within {timeout:g}s")
        time.sleep(POLL_INTERVAL)


def _split_result(
    observation: SplitObservation, weights: tuple[int, int], prefix: str
) -> tuple[bool, str, dict[str, Any]]:
    expected = weights[1] / sum(weights)
    tolerance = split_tolerance(expected, observation.requests)
    share = observation.share("v2")
    ok = observation.all_ok and abs(share - expected) <= tolerance
    v1, v2 = observation.versions.get("v1", 0), observation.versions.get("v2", 0)
    summary = (
        f"{prefix}{observation.requests} requests: v1 {v1}, v2 {v2} (v2 {share:.1%}, expected "
        f"{expected:.0%} +- {tolerance:.1%}); statuses {dict(sorted(observation.statuses.items()))}"
    )
    details = {
        "observation": observation,
        "weights": weights,
        "v2_share": share,
        "expected_v2_share": expected,
        "tolerance": tolerance,
    }
    return ok, summary, details


def step_canary_split(
    state: MeshState,
    client: httpx.Client,
    token: str,
    *,
    requests: int = CANARY_REQUESTS,
    weights: tuple[int, int] = INITIAL_CANARY_WEIGHTS,
) -> StepResult:
    """The frontend's sidecar splits orders between v1 (behind Envoy) and v2 (behind the bundled proxy)
    by the VirtualService weights (Istio VS l.940-955: ``weight / sum(weights)``, picked per request).

    If a previous ``authz demo`` left other weights, they are set back first (and the reload awaited).
    ``details["shadow_before"]`` and ``details["orders_before"]`` are the apps' counts before the requests,
    for :func:`step_mirror`.
    """
    name = "the canary splits orders v1/v2 by the VirtualService weights"
    current = canary_weights(Path(state.canary_file).read_text(encoding="utf-8"))
    prefix = ""
    if (current.get("v1", 0), current.get("v2", 0)) != weights:
        took = set_canary_weights(state, *weights, client=client)
        prefix = f"(weights set back to {weights[0]}/{weights[1]}, reloaded in {took:.1f}s) "
    shadow_before = app_stats(state.app_urls["shadow"], client)
    orders_before = {v: app_stats(state.app_urls[f"orders-{v}"], client) for v in ("v1", "v2")}
    observation = observe_split(state, token, requests=requests, client=client)
    ok, summary, details = _split_result(observation, weights, prefix)
    details |= {"shadow_before": shadow_before, "orders_before": orders_before}
    return StepResult(name, ok, summary, details)


def step_mirror(
    state: MeshState,
    client: httpx.Client,
    *,
    primaries: SplitObservation,
    shadow_before: dict[str, int],
    orders_before: dict[str, dict[str, int]],
    timeout: float = MIRROR_SETTLE_TIMEOUT,
) -> StepResult:
    """``mirror`` + ``mirrorPercentage: 100``: each of the canary step's requests was also copied to the
    shadow, with ``-shadow`` appended to its Host (Envoy RequestMirrorPolicy, DPA l.838-845), fire and
    forget (VS l.464-490). The callers got only the primaries' answers (all 200 from orders v1/v2) and
    no copy reached the primaries."""
    name = "mirrored copies reach the shadow, the primaries are unaffected"
    wanted = shadow_before.get("shadow", 0) + primaries.requests
    deadline = time.monotonic() + timeout
    while True:  # the copies are asynchronous: wait (bounded) for the last ones to land
        shadow = app_stats(state.app_urls["shadow"], client)
        if shadow.get("shadow", 0) >= wanted or time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL)
    mirrored = shadow.get("shadow", 0) - shadow_before.get("shadow", 0)
    leaked = {
        v: app_stats(state.app_urls[f"orders-{v}"], client).get("shadow", 0) - before.get("shadow", 0)
        for v, before in orders_before.items()
    }
    ok = mirrored >= primaries.requests and primaries.all_ok and not any(leaked.values())
    return StepResult(
        name,
        ok,
        f"shadow received {mirrored} copies (Host *-shadow) of {primaries.requests} requests; callers got "
        f"{primaries.statuses.get(200, 0)}/{primaries.requests} 200s, all from orders "
        f"(v1 {primaries.versions.get('v1', 0)}, v2 {primaries.versions.get('v2', 0)}); copies at "
        f"v1/v2: {leaked.get('v1', 0)}/{leaked.get('v2', 0)}",
        {"mirrored": mirrored, "requests": primaries.requests, "leaked": leaked, "primaries": primaries},
    )


def step_hot_reload(
    state: MeshState,
    client: httpx.Client,
    token: str,
    *,
    requests: int = CANARY_REQUESTS,
    weights: tuple[int, int] = MOVED_CANARY_WEIGHTS,
) -> StepResult:
    """Edit the VirtualService to ``weights``: the frontend's proxy reloads it (no restart, no dropped
    request: a new routing generation is swapped in whole) and the observed split follows."""
    name = "editing the VirtualService moves the canary (hot reload)"
    before = canary_weights(Path(state.canary_file).read_text(encoding="utf-8"))
    took = set_canary_weights(state, *weights, client=client)
    observation = observe_split(state, token, requests=requests, client=client)
    prefix = (
        f"{Path(state.canary_file).name}: weights {before.get('v1', 0)}/{before.get('v2', 0)} -> "
        f"{weights[0]}/{weights[1]}, reloaded in {took:.1f}s; then "
    )
    ok, summary, details = _split_result(observation, weights, prefix)
    details |= {"reload_seconds": took, "weights_before": before}
    return StepResult(name, ok, summary, details)


def run_story(
    state: MeshState,
    *,
    say: Callable[[str], None] = print,
    rotation: bool = True,
    canary_requests: int = CANARY_REQUESTS,
) -> list[StepResult]:
    """Every step, printed as it goes. A step that raises is reported as failed, never as a crash."""
    results: list[StepResult] = []

    def record(run: Callable[[], StepResult], title: str) -> StepResult:
        say(f"\n[{len(results) + 1}] {title}")
        started = time.monotonic()
        try:
            result = run()
        except (httpx.HTTPError, DependencyError, OSError, ValueError, KeyError) as exc:
            result = StepResult(title, False, f"error: {exc}")
        mark = "skip" if result.skipped else ("ok" if result.ok else "UNEXPECTED")
        say(f"    {result.summary}")
        say(f"    -> {mark} ({time.monotonic() - started:.1f}s)")
        results.append(result)
        return result

    with httpx.Client(timeout=REQUEST_TIMEOUT, trust_env=False) as client:
        token_box: list[str] = []

        def token() -> str:
            if not token_box:
                token_box.append(fetch_token(state, client=client))
            return token_box[0]

        record(lambda: step_no_token(state, client), "no token: refused")
        record(lambda: step_bad_token(state, client), "a malformed token: 401 with WWW-Authenticate")
        record(
            lambda: step_with_token(state, client, token()),
            "a token from the IdP: allowed, identity headers injected",
        )
        record(
            lambda: step_wrong_identity(state, token()),
            "the wrong workload identity: refused by the `principals` rule",
        )
        record(lambda: explain_denial(state), "`authz check` explains the denial")
        if state.canary_file:
            v1, v2 = INITIAL_CANARY_WEIGHTS
            canary = record(
                lambda: step_canary_split(state, client, token(), requests=canary_requests),
                f"the canary: {v1}/{v2} between orders v1 (Envoy) and v2 (bundled proxy)",
            )
            observation = canary.details.get("observation")

            def mirror() -> StepResult:
                if not isinstance(observation, SplitObservation):
                    return StepResult("mirroring", False, "no canary observation to compare with")
                return step_mirror(
                    state,
                    client,
                    primaries=observation,
                    shadow_before=canary.details["shadow_before"],
                    orders_before=canary.details["orders_before"],
                )

            record(mirror, "mirroring: every request copied to the shadow, primaries unaffected")
            m1, m2 = MOVED_CANARY_WEIGHTS
            record(
                lambda: step_hot_reload(state, client, token(), requests=canary_requests),
                f"edit the VirtualService to {m1}/{m2}: the proxy hot-reloads it, the split follows",
            )
        if rotation:
            record(lambda: rotate_keys_under_load(state), "key rotation at the IdP under load")
    return results

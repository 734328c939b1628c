"""``authz demo``: the story, step by step, against a mesh started by ``authz run``.

Each step makes real requests and returns a :class:`StepResult` saying whether the mesh behaved as the
story says; :func:`run_story` prints them. The integration test calls the same steps and asserts on them.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from authz.errors import DependencyError
from authz.launcher.mesh import MeshState, spiffe_id

__all__ = [
    "ROTATION_REQUESTS",
    "StepResult",
    "call_frontend",
    "explain_denial",
    "fetch_token",
    "rotate_keys_under_load",
    "run_story",
    "step_bad_token",
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
    """A token from the IdP: 200; orders sees the caller's SPIFFE ID (XFCC) and ``x-jwt-sub``, not the
    token (Istio ``forwardOriginalToken`` defaults to false)."""
    reply = call_frontend(state, token, client=client)
    orders = _body(reply).get("orders", {})
    identity = orders.get("identity", {}) if isinstance(orders, dict) else {}
    xfcc = identity.get("x-forwarded-client-cert", "")
    ok = (
        reply.status_code == 200
        and identity.get("x-jwt-sub") == state.client_id
        and spiffe_id("frontend") in xfcc
        and orders.get("authorization_forwarded") is False
    )
    return StepResult(
        "a token from the IdP lets it through",
        ok,
        f"GET /orders with a token -> {reply.status_code}; orders {orders.get('version', '?')} saw "
        f"x-jwt-sub={identity.get('x-jwt-sub', '(missing)')}, caller {spiffe_id('frontend')} "
        f"({'in' if spiffe_id('frontend') in xfcc else 'NOT in'} XFCC), token "
        f"{'forwarded' if orders.get('authorization_forwarded') else 'stripped'}",
        {"status": reply.status_code, "identity": identity, "orders": orders},
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


def run_story(
    state: MeshState, *, say: Callable[[str], None] = print, rotation: bool = True
) -> list[StepResult]:
    """Every step, printed as it goes. A step that raises is reported as failed, never as a crash."""
    results: list[StepResult] = []

    def record(number: int, run: Callable[[], StepResult], title: str) -> None:
        say(f"\n[{number}] {title}")
        started = time.monotonic()
        try:
            result = run()
        except (httpx.HTTPError, DependencyError, OSError, ValueError, KeyError) as exc:
            result = StepResult(title, False, f"error: {exc}")
        mark = "skip" if result.skipped else ("ok" if result.ok else "UNEXPECTED")
        say(f"    {result.summary}")
        say(f"    -> {mark} ({time.monotonic() - started:.1f}s)")
        results.append(result)

    with httpx.Client(timeout=REQUEST_TIMEOUT, trust_env=False) as client:
        token_box: list[str] = []

        def with_token() -> StepResult:
            token_box.append(fetch_token(state, client=client))
            return step_with_token(state, client, token_box[0])

        def wrong_identity() -> StepResult:
            token = token_box[0] if token_box else fetch_token(state, client=client)
            return step_wrong_identity(state, token)

        record(1, lambda: step_no_token(state, client), "no token: refused")
        record(2, lambda: step_bad_token(state, client), "a malformed token: 401 with WWW-Authenticate")
        record(3, with_token, "a token from the IdP: allowed, identity headers injected")
        record(4, wrong_identity, "the wrong workload identity: refused by the `principals` rule")
        record(5, lambda: explain_denial(state), "`authz check` explains the denial")
        if rotation:
            record(6, lambda: rotate_keys_under_load(state), "key rotation at the IdP under load")
    return results

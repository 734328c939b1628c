"""``authz check`` decides as the authorizer would: tokens validated against a real IdP over a socket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from authz.idp import running_idp

pytestmark = [pytest.mark.integration]

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: orders}}
spec:
  jwtRules: [{{issuer: "{issuer}", audiences: [orders]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: alice-only, namespace: orders}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: ["{issuer}/alice"]}}}}]
"""


def check(folder: Path, request: dict[str, object], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz.cli", "check", "--policies", str(folder), "--request", "-", *extra],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_validates_tokens_and_explains(tmp_path: Path) -> None:
    with running_idp() as idp:
        issuer = idp.issuer()
        (tmp_path / "p.yaml").write_text(POLICIES.format(issuer=issuer.issuer_url))
        alice = issuer.mint(sub="alice", aud="orders")
        ok = check(tmp_path, {"namespace": "orders", "path": "/x", "token": alice})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "ALLOW: allowed by ALLOW rule ns[orders]-policy[alice-only]-rule[0]" in ok.stdout
        bob = check(
            tmp_path, {"namespace": "orders", "token": issuer.mint(sub="bob", aud="orders")}, "--json"
        )
        assert bob.returncode == 1
        out = json.loads(bob.stdout)
        assert (out["status"], out["reason"], out["policyId"]) == (403, "no_allow_match", "none")
        assert out["requestPrincipal"] == f"{issuer.issuer_url}/bob"
        forged = check(tmp_path, {"namespace": "orders", "token": alice[:-4] + "AAAA"})
        assert forged.returncode == 1
        assert forged.stdout.startswith("DENY (401): ")
        claims = check(
            tmp_path, {"namespace": "orders", "claims": {"iss": issuer.issuer_url, "sub": "alice"}}
        )
        assert claims.returncode == 0  # claims are taken as verified: no IdP needed


def test_lint_reports_request_authentication_errors(tmp_path: Path) -> None:
    (tmp_path / "ra.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: n}\n"
        "spec:\n  jwtRules:\n  - issuer: https://x\n    jwksUri: ftp://x/keys\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "authz.cli", "lint", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert f"{tmp_path / 'ra.yaml'}:7: spec.jwtRules[0].jwksUri" in out.stdout

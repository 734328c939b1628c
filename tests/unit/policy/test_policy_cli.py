"""``authz check|test|lint`` on the example policies, and the package's public names."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import authz.policy
from authz import policy_cli as cli
from authz.errors import ConfigError
from authz.policy.requestfile import parse_request_file

ROOT = Path(__file__).resolve().parents[3]
POLICIES = ROOT / "policies"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_check_allow_and_deny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    req = tmp_path / "r.yaml"
    req.write_text(
        "method: GET\npath: /orders\nsource: {principal: spiffe://cluster.local/ns/web/sa/frontend}\n"
        "destination: {port: 8080}\nworkload: {namespace: orders, labels: {app: orders}}\n"
    )
    assert run(["check", "--policies", str(POLICIES), "--request", str(req)]) == 0
    assert "allowed by ALLOW rule ns[orders]-policy[orders-read-write]-rule[0]" in capsys.readouterr().out
    req.write_text("method: DELETE\npath: /orders\nworkload: {namespace: orders, labels: {app: orders}}\n")
    assert run(["check", "--policies", str(POLICIES), "--request", str(req), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["allowed"] is False and out["policyId"] == "none" and out["trace"]


def test_check_bad_request_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    req = tmp_path / "r.yaml"
    req.write_text("metod: GET\n")
    assert run(["check", "--policies", str(POLICIES), "--request", str(req)]) == 2
    assert "unknown field" in capsys.readouterr().err


def test_test_command_on_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["test", str(POLICIES)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "0 failed" in out


def test_test_command_reports_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: n}\nspec: {}\n"  # noqa: E501
        "---\napiVersion: meshauthz.dev/v1alpha1\nkind: AuthorizationPolicyTest\nmetadata: {name: t, namespace: n}\n"  # noqa: E501
        "spec:\n  cases:\n  - name: wrongly expects allow\n    request: {namespace: n}\n    expect: allow\n"
    )
    assert run(["test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "expected allow, got deny" in out


def test_lint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["lint", str(POLICIES)]) == 0
    assert "warning" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: DENY\n"  # noqa: E501
    )
    assert run(["lint", str(tmp_path)]) == 1
    assert f"{tmp_path / 'bad.yaml'}:5: spec.rules:" in capsys.readouterr().out


def test_parse_request_file() -> None:
    req, wl, auth = parse_request_file(
        {
            "method": "POST",
            "path": "/x",
            "headers": {"X-A": ["1", "2"]},
            "port": 80,
            "namespace": "n",
            "labels": {"app": "a"},
            "claims": {"sub": "s"},
            "spaceDelimitedClaims": ["roles"],
        }
    )
    assert req.http is not None and req.http.headers == {"x-a": "1,2"} and req.destination.port == 80
    assert wl.namespace == "n" and wl.labels == {"app": "a"}
    assert auth is not None and "roles" in auth.space_delimited
    tcp, _, none = parse_request_file({"tcp": True})
    assert tcp.http is None and none is None
    for bad in ({"port": "http"}, {"headers": {"a": {"b": 1}}}, {"tcp": "yes"}, {"claims": []}, []):
        with pytest.raises(ConfigError):
            parse_request_file(bad)


def test_public_api() -> None:
    assert set(authz.policy.__all__) == {
        "Action", "AuthorizationPolicy", "CompiledPolicies", "FieldMatch", "PolicyResult", "PolicyWarning",
        "Rule", "check_http_request", "compile_policies", "evaluate", "load_authorization_policies",
        "normalize_path",
    }  # fmt: skip
    for name in authz.policy.__all__:
        assert hasattr(authz.policy, name)


def test_test_command_checks_expected_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text(
        """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: r, namespace: n}
spec:
  jwtRules:
  - issuer: https://idp
    jwksUri: http://127.0.0.1:1/jwks   # never fetched: test cases carry verified claims
    outputClaimToHeaders: [{header: x-sub, claim: sub}, {header: x-team, claim: org.team}]
---
apiVersion: meshauthz.dev/v1alpha1
kind: AuthorizationPolicyTest
metadata: {name: t, namespace: n}
spec:
  cases:
  - name: headers
    request: {namespace: n, claims: {iss: https://idp, sub: al, org: {team: x}}}
    expect: {allowed: true, headers: {x-sub: al, x-team: x, x-absent: null}}
  - name: wrong
    request: {namespace: n, claims: {iss: https://idp, sub: bob}}
    expect: {allowed: true, headers: {x-sub: al}}
"""
    )
    assert run(["test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "PASS" in out and "expected header x-sub 'al', got 'bob'" in out and "1 passed, 1 failed" in out


def test_lint_warns_about_private_key_material_in_inline_jwks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The RA still loads (its public part verifies tokens), but lint names the leaked secret's line."""
    from authz.authn.testing import SigningKey

    key = SigningKey.generate("ES256", kid="leaked")
    public = key.public_jwk()
    leaked = {**public, "d": "c2VjcmV0LXNjYWxhci1ub3QtcmVhbGx5LWEta2V5LWJ1dC1mb3JtYXR0ZWQ"}

    def ra(jwk: dict[str, object]) -> str:
        return (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
            "metadata: {name: ra, namespace: web}\nspec:\n  jwtRules:\n  - issuer: https://idp.example\n"
            f"    jwks: '{json.dumps({'keys': [jwk]})}'\n"
        )

    (tmp_path / "ra.yaml").write_text(ra(public))
    assert run(["lint", str(tmp_path)]) == 0
    assert "private key material" not in capsys.readouterr().out
    (tmp_path / "ra.yaml").write_text(ra(leaked))
    assert run(["lint", str(tmp_path)]) == 0  # warnings only
    out = capsys.readouterr().out
    assert f"{tmp_path / 'ra.yaml'}:7: warning: spec.jwtRules[0].jwks:" in out
    assert "private key material" in out

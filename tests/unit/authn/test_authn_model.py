"""RequestAuthentication parsing, webhook validation (errors name file:line:field) and rule merging."""

from __future__ import annotations

import json

import pytest
from authn_kit import resources

from authz.authn.model import (
    DEFAULT_LOCATIONS,
    JwtHeader,
    jwt_rules_for,
    load_request_authentications,
)
from authz.authn.testing import SigningKey, jwks_document
from authz.errors import ConfigErrors
from authz.request import Workload

FULL = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  jwtRules:
  - issuer: https://idp.test
    audiences: [api, web]
    jwksUri: https://idp.test/jwks
    fromHeaders:
    - name: X-Jwt
      prefix: "Token "
    fromParams: [tok]
    fromCookies: [session]
    outputPayloadToHeader: X-Payload
    forwardOriginalToken: true
    outputClaimToHeaders:
    - header: X-Sub
      claim: sub
    - header: x-nested
      claim: nested.key
    timeout: 250ms
    spaceDelimitedClaims: [custom_scope, teams]
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_request_authentications(resources(text))
    return [str(e) for e in info.value.errors]


def ra(spec: str, *, version: str = "v1", name: str = "ra", ns: str = "foo", extra_meta: str = "") -> str:
    return (
        f"apiVersion: security.istio.io/{version}\nkind: RequestAuthentication\n"
        f"metadata:\n  name: {name}\n  namespace: {ns}\n{extra_meta}spec:\n{spec}"
    )


def test_every_field_is_parsed() -> None:
    [parsed] = load_request_authentications(resources(FULL))
    [rule] = parsed.jwt_rules
    assert parsed.match_labels == {"app": "httpbin"}
    assert rule.issuer == "https://idp.test"
    assert rule.audiences == ("api", "web")
    assert rule.jwks_uri == "https://idp.test/jwks"
    assert rule.from_headers == (JwtHeader("x-jwt", "Token "),)
    assert rule.params == ("tok",)
    assert rule.cookies == ("session",)
    assert rule.output_payload_to_header == "x-payload"
    assert rule.forward_original_token is True
    assert [(c.header, c.claim) for c in rule.output_claim_to_headers] == [
        ("x-sub", "sub"),
        ("x-nested", "nested.key"),
    ]
    assert rule.timeout == pytest.approx(0.25)
    assert rule.space_delimited == {"scope", "permission", "custom_scope", "teams"}
    assert rule.origin == "foo/jwt.jwtRules[0]"


def test_defaults_apply_only_when_no_location_is_configured() -> None:
    [parsed] = load_request_authentications(resources(ra("  jwtRules:\n  - issuer: a\n")))
    [rule] = parsed.jwt_rules
    assert rule.headers == DEFAULT_LOCATIONS
    assert rule.params == ("access_token",)
    assert rule.timeout == 5.0
    assert rule.forward_original_token is False
    [parsed] = load_request_authentications(
        resources(ra("  jwtRules:\n  - issuer: a\n    fromCookies: [c]\n"))
    )
    assert parsed.jwt_rules[0].headers == ()
    assert parsed.jwt_rules[0].params == ()


def test_v1beta1_is_accepted_and_other_kinds_ignored() -> None:
    text = ra("  jwtRules:\n  - issuer: a\n", version="v1beta1") + (
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: foo}\nspec: {}\n"
    )
    assert [r.name for r in load_request_authentications(resources(text))] == ["ra"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "  jwtRules:\n  - audiences: [a]\n",
            "policies.yaml:8: spec.jwtRules[0]: RequestAuthentication foo/ra: issuer or jwksUri must be set",
        ),
        ("  jwtRules:\n  - issuer: a\n    jwksUri: ftp://x/jwks\n", "spec.jwtRules[0].jwksUri"),
        ("  jwtRules:\n  - issuer: a\n    jwksUri: http://169.254.169.254/keys\n", "link-local"),
        ("  jwtRules:\n  - issuer: a\n    jwksUri: 'http://[fe80::1]/keys'\n", "link-local"),
        ("  jwtRules:\n  - issuer: a\n    jwksUri: 'http://x:port/'\n", "invalid URL"),
        (
            "  jwtRules:\n  - issuer: a\n    jwksUri: https://x/j\n    jwks: '{}'\n",
            "only one of jwks or jwksUri",
        ),
        ("  jwtRules:\n  - issuer: a\n    jwks: '{\"keys\": 1}'\n", 'has no "keys" array'),
        ("  jwtRules:\n  - issuer: a\n    fromHeaders: [{prefix: x}]\n", "fromHeaders[0].name: "),
        ("  jwtRules:\n  - issuer: a\n    fromParams: ['']\n", "fromParams[0]: "),
        (
            "  jwtRules:\n  - issuer: a\n    outputClaimToHeaders: [{header: 'x y', claim: c}]\n",
            "invalid header name",
        ),
        (
            "  jwtRules:\n  - issuer: a\n    outputClaimToHeaders:\n"
            "    - {header: x, claim: a}\n    - {header: X, claim: b}\n",
            "duplicate header",
        ),
        ("  jwtRules:\n  - issuer: a\n    outputClaimToHeaders: [{header: x}]\n", "claim: "),
        ("  jwtRules:\n  - issuer: a\n    timeout: 5\n", "must be a duration"),
        ("  jwtRules:\n  - issuer: a\n    timeout: 0s\n", "greater than zero"),
        ("  jwtRules:\n  - issuer: a\n    issuerr: b\n", "unknown field 'issuerr'"),
        ("  jwtRules:\n  - issuer: ''\n    jwksUri: https://x/j\n", "must not be empty when set"),
        (
            "  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Gateway, name: g}]\n",
            "only one of selector",
        ),
        ("  selector: {matchLabels: {app: 'a*'}}\n", "without '*'"),
    ],
)
def test_webhook_validation_errors_name_file_line_and_field(spec: str, expected: str) -> None:
    errs = errors_of(ra(spec))
    assert any(expected in e for e in errs), errs
    assert all(e.startswith("policies.yaml:") for e in errs)


def test_too_many_space_delimited_claims() -> None:
    claims = json.dumps([f"c{i}" for i in range(65)])
    assert any(
        "at most 64" in e
        for e in errors_of(ra(f"  jwtRules:\n  - issuer: a\n    spaceDelimitedClaims: {claims}\n"))
    )


def test_dry_run_annotation_is_rejected() -> None:
    meta = "  annotations:\n    istio.io/dry-run: 'true'\n"
    assert any("dry-run" in e for e in errors_of(ra("  jwtRules:\n  - issuer: a\n", extra_meta=meta)))


def test_unsupported_api_version_is_rejected() -> None:
    assert any("unsupported apiVersion" in e for e in errors_of(ra("  jwtRules: []\n", version="v1alpha1")))


def test_all_errors_of_a_load_are_reported_together() -> None:
    text = (
        ra("  jwtRules:\n  - audiences: [a]\n  - issuer: b\n    timeout: x\n")
        + "---\n"
        + ra("  jwtRules:\n  - fromParams: [1]\n", name="two")
    )
    errs = errors_of(text)
    assert len(errs) >= 3
    assert any(":8:" in e for e in errs) and any("foo/two" in e for e in errs)


def test_duplicate_names_are_rejected() -> None:
    text = ra("  jwtRules: []\n") + "---\n" + ra("  jwtRules: []\n")
    assert any("duplicate RequestAuthentication" in e for e in errors_of(text))


def test_inline_jwks_is_validated_and_accepted() -> None:
    doc = json.dumps(jwks_document(SigningKey.generate("ES256")))
    [parsed] = load_request_authentications(resources(ra(f"  jwtRules:\n  - issuer: a\n    jwks: '{doc}'\n")))
    assert parsed.jwt_rules[0].jwks == doc


MERGE = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: mesh, namespace: istio-system}
spec:
  jwtRules: [{issuer: zeta}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ns, namespace: foo}
spec:
  jwtRules: [{issuer: beta}, {issuer: alpha}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: wl, namespace: foo}
spec:
  selector: {matchLabels: {app: a}}
  jwtRules: [{issuer: gamma}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: other-ns, namespace: bar}
spec:
  jwtRules: [{issuer: never}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: gw, namespace: foo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]
  jwtRules: [{issuer: gateway-only}]
"""


def test_rules_of_all_matching_policies_merge_sorted_by_issuer() -> None:
    ras = load_request_authentications(resources(MERGE))
    wl = Workload(namespace="foo", labels={"app": "a"})
    assert [r.issuer for r in jwt_rules_for(ras, wl, root_namespace="istio-system")] == [
        "alpha",
        "beta",
        "gamma",
        "zeta",
    ]
    other = Workload(namespace="foo", labels={"app": "b"})
    assert [r.issuer for r in jwt_rules_for(ras, other, root_namespace="istio-system")] == [
        "alpha",
        "beta",
        "zeta",
    ]
    assert [r.issuer for r in jwt_rules_for(ras, Workload("baz"), root_namespace="istio-system")] == ["zeta"]


def test_rule_fingerprint_is_stable_and_sensitive() -> None:
    ras = load_request_authentications(resources(MERGE))
    again = load_request_authentications(resources(MERGE))
    assert ras[1].jwt_rules[0].fingerprint == again[1].jwt_rules[0].fingerprint
    assert ras[1].jwt_rules[0].fingerprint != ras[1].jwt_rules[1].fingerprint

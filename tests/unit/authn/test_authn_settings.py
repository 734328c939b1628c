"""JWTIssuerSettings: parsing, validation, defaults, and secret resolution at the edge."""

from __future__ import annotations

import pytest
from authn_kit import resources

from authz.authn.settings import (
    DEFAULT_CLOCK_SKEW,
    AuthnSettings,
    CertificateBinding,
    SecretRef,
    SpiffeBinding,
    load_issuer_settings,
    resolve_secrets,
)
from authz.errors import ConfigErrors

FULL = """\
apiVersion: meshauthz.dev/v1alpha1
kind: JWTIssuerSettings
metadata: {name: corp, namespace: istio-system}
spec:
  issuer: https://idp.test
  clockSkew: 30s
  maxTokenBytes: 4096
  jwks:
    minCacheDuration: 10s
    maxCacheDuration: 1h
    defaultCacheDuration: 2m
    refreshBeforeExpiry: 15s
    unknownKidCooldown: 5s
    maxStaleness: 2h
    caBundleFile: /etc/idp/ca.pem
  requiredClaims: [exp, sub]
  hmacSecrets:
  - kid: legacy-1
    algorithm: HS384
    secretRef: {env: LEGACY_SECRET}
  introspection:
    endpoint: https://idp.test/introspect
    clientId: meshauthz
    clientSecretRef: {file: /run/secrets/client}
    authMethod: client_secret_post
    cacheDuration: 30s
  certificateBinding: required
  spiffeBinding:
    claim: azp
    pattern: "system:serviceaccount:{namespace}:{service_account}"
"""


def settings_doc(spec: str) -> str:
    return (
        "apiVersion: meshauthz.dev/v1alpha1\nkind: JWTIssuerSettings\n"
        f"metadata: {{name: s, namespace: istio-system}}\nspec:\n{spec}"
    )


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_issuer_settings(resources(text))
    return [str(e) for e in info.value.errors]


def test_every_field_is_parsed() -> None:
    s = load_issuer_settings(resources(FULL)).for_issuer("https://idp.test")
    assert s.clock_skew == 30.0
    assert s.max_token_bytes == 4096
    assert (s.jwks.min_cache_duration, s.jwks.max_cache_duration, s.jwks.default_cache_duration) == (
        10,
        3600,
        120,
    )
    assert (s.jwks.refresh_before_expiry, s.jwks.unknown_kid_cooldown, s.jwks.max_staleness) == (15, 5, 7200)
    assert s.jwks.ca_bundle_file == "/etc/idp/ca.pem"
    assert s.required_claims == ("exp", "sub")
    assert s.hmac_secrets[0].kid == "legacy-1" and s.hmac_secrets[0].algorithm == "HS384"
    assert s.hmac_secrets[0].ref == SecretRef(env="LEGACY_SECRET")
    assert s.introspection is not None and s.introspection.auth_method == "client_secret_post"
    assert s.introspection.client_secret_ref == SecretRef(file="/run/secrets/client")
    assert s.certificate_binding is CertificateBinding.REQUIRED
    assert s.spiffe_binding == SpiffeBinding(
        claim="azp", pattern="system:serviceaccount:{namespace}:{service_account}"
    )


def test_unconfigured_issuers_get_defaults() -> None:
    s = AuthnSettings().for_issuer("https://x")
    assert s.issuer == "https://x"
    assert s.clock_skew == DEFAULT_CLOCK_SKEW == 60.0
    assert s.certificate_binding is CertificateBinding.DISABLED
    assert s.hmac_keys == ()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("  clockSkew: 1s\n", "spec.issuer: "),
        ("  issuer: a\n  clockSkew: 60\n", "must be a duration"),
        ("  issuer: a\n  certificateBinding: maybe\n", "required, optional or disabled"),
        ("  issuer: a\n  spiffeBinding: {pattern: 'x-{pod}'}\n", "unknown or unterminated placeholder"),
        ("  issuer: a\n  spiffeBinding: {pattern: 'x-{namespace'}\n", "spec.spiffeBinding.pattern"),
        (
            "  issuer: a\n  hmacSecrets: [{kid: k, secretRef: {env: A, file: /b}}]\n",
            "exactly one of env or file",
        ),
        ("  issuer: a\n  hmacSecrets: [{kid: k, secret: hunter2}]\n", "unknown field 'secret'"),
        ("  issuer: a\n  hmacSecrets: [{kid: k}]\n", "secretRef: "),
        ("  issuer: a\n  hmacSecrets: [{algorithm: RS256, secretRef: {env: A}}]\n", "must be one of"),
        ("  issuer: a\n  jwks: {minCacheDuration: 2h, maxCacheDuration: 1h}\n", "must not exceed"),
        (
            "  issuer: a\n  introspection: {endpoint: 'file:///x', clientId: c, clientSecretRef: {env: A}}\n",
            "http",
        ),
        ("  issuer: a\n  maxTokenBytes: 10\n", "at least 256"),
        ("  issuer: a\n  colckSkew: 1s\n", "unknown field 'colckSkew'"),
    ],
)
def test_validation_errors_are_located(spec: str, expected: str) -> None:
    errs = errors_of(settings_doc(spec))
    assert any(expected in e for e in errs), errs
    assert all(e.startswith("policies.yaml:") for e in errs)


def test_two_settings_for_one_issuer_are_rejected() -> None:
    doc = settings_doc("  issuer: a\n")
    assert any(
        "already configured" in e for e in errors_of(doc + "---\n" + doc.replace("name: s", "name: t"))
    )


def test_resolve_secrets_builds_hmac_keys_and_client_secret() -> None:
    loaded = load_issuer_settings(resources(FULL))
    files = {"/run/secrets/client": b"client-secret\n"}
    resolved = resolve_secrets(loaded, environ={"LEGACY_SECRET": "x" * 48}, read_file=lambda p: files[p])
    s = resolved.for_issuer("https://idp.test")
    assert [k.kid for k in s.hmac_keys] == ["legacy-1"]
    assert s.hmac_keys[0].algorithms == {"HS384"}
    assert s.introspection is not None and s.introspection.client_secret == "client-secret"


def test_unresolvable_secrets_are_reported_without_values() -> None:
    loaded = load_issuer_settings(resources(FULL))

    def no_file(path: str) -> bytes:
        raise FileNotFoundError(path)

    with pytest.raises(ConfigErrors) as info:
        resolve_secrets(loaded, environ={"LEGACY_SECRET": "short"}, read_file=no_file)
    text = str(info.value)
    assert "HS384 needs a secret of at least 48 bytes" in text
    assert "file:/run/secrets/client" in text
    assert "short" not in text.replace("shorter", "")

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import ConfigError, ConfigErrors
from authz.idp.config import DEFAULT_CONFIG_YAML, default_config, parse_config

HEADER = "apiVersion: meshauthz.dev/v1alpha1\nkind: MockIdentityProvider\nmetadata: {name: t}\nspec:\n"


def test_default_config_has_one_issuer_a_demo_client_and_users() -> None:
    config = default_config()
    assert [i.name for i in config.issuers] == ["demo"]
    issuer = config.issuers[0]
    assert {c.client_id for c in issuer.clients} == {"demo-client", "demo-spa"}
    assert [u.username for u in issuer.users] == ["alice", "bob"]
    spa = next(c for c in issuer.clients if c.client_id == "demo-spa")
    assert spa.is_public and "client_credentials" not in spa.grant_types
    assert [k.alg for k in issuer.keys] == ["RS256", "ES256"]


def test_full_issuer_fields_are_read() -> None:
    config = parse_config(
        HEADER
        + """\
  publicUrl: https://idp.example/
  issuers:
    - name: a
      issuer: https://issuer.example/
      keys: [{alg: EdDSA, kid: k1}]
      audience: api
      accessTokenTtlSeconds: 60
      jwksMaxAgeSeconds: 0
      login: form
      rotateRefreshTokens: false
      clockOffsetSeconds: -30
      trustedClientCertHeader: X-Client-Cert
      clients:
        - {clientId: c, accessTokenFormat: opaque, scopes: [read], tlsThumbprints: [abc]}
      users:
        - {username: u, sub: s-1, claims: {groups: [g]}}
"""
    )
    assert config.public_url == "https://idp.example"
    issuer = config.issuers[0]
    assert issuer.issuer == "https://issuer.example"
    assert issuer.signing_alg == "EdDSA" and issuer.keys[0].kid == "k1"
    assert issuer.audience == ("api",)
    assert issuer.access_token_ttl == 60 and issuer.jwks_max_age == 0
    assert issuer.login == "form" and issuer.rotate_refresh_tokens is False
    assert issuer.clock_offset == -30
    assert issuer.trusted_client_cert_header == "x-client-cert"
    client = issuer.clients[0]
    assert client.access_token_format == "opaque" and client.scopes == ("read",)
    assert client.secret_generated and len(client.client_secret) >= 32
    assert issuer.users[0].subject == "s-1"


def test_generated_secrets_differ_between_loads() -> None:
    text = HEADER + "  issuers: [{name: a, clients: [{clientId: c}]}]\n"
    assert (
        parse_config(text).issuers[0].clients[0].client_secret
        != parse_config(text).issuers[0].clients[0].client_secret
    )


@pytest.mark.parametrize(
    ("body", "line", "field", "message"),
    [
        ("  issuers: []\n", 5, "spec.issuers", "at least one issuer"),
        ("  issuers:\n    - name: a\n      bogus: 1\n", 7, "spec.issuers[0].bogus", "unknown field"),
        (
            "  issuers:\n    - name: a\n      keys: [{alg: HS256}]\n",
            7,
            "spec.issuers[0].keys[0].alg",
            "must be one of",
        ),
        (
            "  issuers:\n    - name: a\n      signingAlg: ES256\n",
            7,
            "spec.issuers[0].signingAlg",
            "no key with alg",
        ),
        ("  issuers:\n    - name: a\n    - name: a\n", 7, "spec.issuers[1].name", "duplicate issuer"),
        ("  issuers:\n    - name: 'a/b'\n", 6, "spec.issuers[0].name", "letters, digits"),
        (
            "  issuers:\n    - name: a\n      clients:\n"
            "        - clientId: c\n          grantTypes: [implicit]\n",
            9,
            "spec.issuers[0].clients[0].grantTypes[0]",
            "must be one of",
        ),
        (
            "  issuers:\n    - name: a\n      clients:\n"
            "        - {clientId: c, authMethod: none, grantTypes: [client_credentials]}\n",
            8,
            "spec.issuers[0].clients[0].grantTypes",
            "public client",
        ),
        (
            "  issuers:\n    - name: a\n      clients: [{clientId: c}, {clientId: c}]\n",
            7,
            "spec.issuers[0].clients",
            "duplicate clientId",
        ),
        (
            "  issuers:\n    - name: a\n      accessTokenTtlSeconds: 0\n",
            7,
            "spec.issuers[0].accessTokenTtlSeconds",
            ">= 1",
        ),
        (
            "  issuers:\n    - name: a\n      users: [{password: x}]\n",
            7,
            "spec.issuers[0].users[0].username",
            "required",
        ),
    ],
)
def test_mistakes_name_file_line_and_field(body: str, line: int, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(HEADER + body, "idp.yaml")
    err = info.value
    assert (err.file, err.line, err.field) == ("idp.yaml", line, field)
    assert message in err.message


def test_wrong_kind_and_document_count_are_refused() -> None:
    with pytest.raises(ConfigError, match="must be MockIdentityProvider"):
        parse_config(HEADER.replace("MockIdentityProvider", "Other") + "  issuers: [{name: a}]\n")
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config(DEFAULT_CONFIG_YAML + "---\n" + DEFAULT_CONFIG_YAML)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_config_errors(text: str) -> None:
    with contextlib.suppress(ConfigError, ConfigErrors):
        parse_config(text)

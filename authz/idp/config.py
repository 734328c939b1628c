"""Configuration of the mock OpenID Provider: one YAML resource, frozen dataclasses, errors with file:line.

The file is one Kubernetes-style document (``kind: MockIdentityProvider``) parsed by
:mod:`authz.resources`, so every mistake names its file, line and field. Secrets are never needed in it:
signing keys are generated at start, and a confidential client without ``clientSecret`` gets a random
one (the CLI prints it).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from authz.errors import ConfigError
from authz.resources import FieldPath, Resource, parse_documents

__all__ = [
    "ACCESS_TOKEN_FORMATS",
    "API_VERSION",
    "CLIENT_AUTH_METHODS",
    "DEFAULT_CONFIG_YAML",
    "GRANT_TYPES",
    "KIND",
    "LOGIN_MODES",
    "SIGNING_ALGS",
    "ClientConfig",
    "IdpConfig",
    "IssuerConfig",
    "KeyConfig",
    "UserConfig",
    "default_config",
    "parse_config",
]

API_VERSION = "meshauthz.dev/v1alpha1"
KIND = "MockIdentityProvider"

SIGNING_ALGS = ("RS256", "ES256", "EdDSA")
GRANT_TYPES = ("client_credentials", "authorization_code", "refresh_token", "password")
# RFC 8414 section 2 / OIDC Discovery: token_endpoint_auth_methods_supported; RFC 8705 section 2.
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none", "tls_client_auth")
ACCESS_TOKEN_FORMATS = ("jwt", "opaque")
LOGIN_MODES = ("auto", "form")

DEFAULT_ACCESS_TOKEN_TTL = 3600.0  # one hour, the common IdP default (Keycloak 5 min is too short for demos)
DEFAULT_ID_TOKEN_TTL = 3600.0  # same as the access token, as Auth0 and Keycloak do
DEFAULT_REFRESH_TOKEN_TTL = 86400.0  # a day: long enough for any test session
DEFAULT_CODE_TTL = 60.0  # RFC 6749 section 4.1.2: "A maximum authorization code lifetime of 10 minutes"
DEFAULT_JWKS_MAX_AGE = 300  # seconds; short so rotation tests see new keys, long enough to test caching
DEFAULT_SIGNING_ALG = "RS256"  # the only alg every JWT library and Envoy's jwt_authn supports


@dataclass(frozen=True)
class KeyConfig:
    """A signing key generated at start. Only the algorithm is configurable; keys never touch disk."""

    alg: str = DEFAULT_SIGNING_ALG
    kid: str = ""  # empty: the RFC 7638 thumbprint of the generated key


@dataclass(frozen=True)
class UserConfig:
    username: str
    password: str = ""  # empty: the password grant is refused for this user
    sub: str = ""  # empty: the username
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return self.sub or self.username


@dataclass(frozen=True)
class ClientConfig:
    client_id: str
    client_secret: str = ""
    auth_method: str = "client_secret_basic"
    grant_types: tuple[str, ...] = GRANT_TYPES
    redirect_uris: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()  # empty: the issuer's default audience, else the client id
    scopes: tuple[str, ...] = ()  # empty: any scope may be requested
    claims: Mapping[str, Any] = field(default_factory=dict)
    access_token_format: str = "jwt"
    tls_thumbprints: tuple[str, ...] = ()  # RFC 8705 section 2.1: accepted x5t#S256 values (empty: any)
    secret_generated: bool = False  # True when no clientSecret was configured and one was made at start

    @property
    def is_public(self) -> bool:
        return self.auth_method == "none"


@dataclass(frozen=True)
class IssuerConfig:
    name: str
    issuer: str = ""  # empty: ``<server url>/issuers/<name>``
    keys: tuple[KeyConfig, ...] = (KeyConfig(),)
    signing_alg: str = DEFAULT_SIGNING_ALG
    audience: tuple[str, ...] = ()
    access_token_ttl: float = DEFAULT_ACCESS_TOKEN_TTL
    id_token_ttl: float = DEFAULT_ID_TOKEN_TTL
    refresh_token_ttl: float = DEFAULT_REFRESH_TOKEN_TTL
    code_ttl: float = DEFAULT_CODE_TTL
    jwks_max_age: int = DEFAULT_JWKS_MAX_AGE
    login: str = "auto"
    rotate_refresh_tokens: bool = True
    clock_offset: float = 0.0
    # Dev-only: a request header carrying the client certificate (URL-encoded PEM, as nginx's
    # ``$ssl_client_escaped_cert`` or Envoy XFCC ``Cert=``), trusted as if it came from the TLS layer.
    trusted_client_cert_header: str = ""
    clients: tuple[ClientConfig, ...] = ()
    users: tuple[UserConfig, ...] = ()


@dataclass(frozen=True)
class IdpConfig:
    issuers: tuple[IssuerConfig, ...]
    public_url: str = ""  # empty: the URL the server is bound to
    file: str = "<default>"


DEFAULT_CONFIG_YAML = f"""\
# The embedded default: one issuer, a demo client, a demo user. Development only.
apiVersion: {API_VERSION}
kind: {KIND}
metadata:
  name: default
spec:
  issuers:
    - name: demo
      keys: [{{alg: RS256}}, {{alg: ES256}}]
      audience: [demo-api]
      clients:
        - clientId: demo-client
          clientSecret: demo-secret  # dev-only value, not a secret
          redirectUris: [http://127.0.0.1/callback, http://localhost/callback]
          claims: {{tenant: demo}}
        - clientId: demo-spa
          authMethod: none
          grantTypes: [authorization_code, refresh_token]
          redirectUris: [http://127.0.0.1/callback, http://localhost/callback]
      users:
        - username: alice
          password: alice  # dev-only value, not a secret
          claims: {{name: Alice, email: alice@example.com, groups: [admins, users]}}
        - username: bob
          password: bob  # dev-only value, not a secret
          claims: {{name: Bob, email: bob@example.com, groups: [users]}}
"""


def default_config() -> IdpConfig:
    """The embedded default configuration (``authz idp`` with no ``--config``)."""
    return parse_config(DEFAULT_CONFIG_YAML, "<default>")


def parse_config(text: str, file: str = "<string>") -> IdpConfig:
    """Parse one ``MockIdentityProvider`` document. Raises ConfigErrors / ConfigError naming file:line."""
    try:
        docs = parse_documents(text, file)
    except yaml.YAMLError as exc:  # authz.resources lets the reader's errors (control characters) escape
        raise ConfigError(f"YAML syntax error: {exc}", file=file) from exc
    if len(docs) != 1:
        raise ConfigError(f"expected exactly one {KIND} document, found {len(docs)}", file=file)
    res = docs[0]
    return _Reader(res).idp()


class _Reader:
    """Walks ``spec`` and raises :meth:`Resource.error` with the exact field path on the first mistake."""

    def __init__(self, res: Resource) -> None:
        self.res = res

    def fail(self, path: FieldPath, message: str) -> Exception:
        return self.res.error(path, message)

    def mapping(self, value: Any, path: FieldPath) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, "must be a mapping")
        return value

    def known(self, data: Mapping[str, Any], path: FieldPath, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                raise self.fail((*path, key), f"unknown field (allowed: {', '.join(allowed)})")

    def string(self, data: Mapping[str, Any], key: str, path: FieldPath, default: str = "") -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            raise self.fail((*path, key), "must be a string")
        return value

    def choice(
        self, data: Mapping[str, Any], key: str, path: FieldPath, default: str, options: tuple[str, ...]
    ) -> str:
        value = self.string(data, key, path, default)
        if value not in options:
            raise self.fail((*path, key), f"must be one of {', '.join(options)}")
        return value

    def number(
        self, data: Mapping[str, Any], key: str, path: FieldPath, default: float, minimum: float = 1
    ) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise self.fail((*path, key), f"must be a number >= {minimum}")
        return float(value)

    def boolean(self, data: Mapping[str, Any], key: str, path: FieldPath, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail((*path, key), "must be true or false")
        return value

    def strings(
        self, data: Mapping[str, Any], key: str, path: FieldPath, default: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        value = data.get(key, list(default))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail((*path, key), "must be a list of non-empty strings")
        return tuple(value)

    def claims(self, data: Mapping[str, Any], key: str, path: FieldPath) -> dict[str, Any]:
        return dict(self.mapping(data.get(key), (*path, key)))

    def items(
        self, data: Mapping[str, Any], key: str, path: FieldPath
    ) -> list[tuple[FieldPath, dict[str, Any]]]:
        value = data.get(key) or []
        if not isinstance(value, list):
            raise self.fail((*path, key), "must be a list")
        return [(p := (*path, key, i), self.mapping(v, p)) for i, v in enumerate(value)]

    def idp(self) -> IdpConfig:
        res = self.res
        if res.kind != KIND:
            raise self.fail(("kind",), f"must be {KIND}")
        spec = self.mapping(res.spec, ("spec",))
        self.known(spec, ("spec",), ("issuers", "publicUrl"))
        issuers = tuple(self.issuer(p, d) for p, d in self.items(spec, "issuers", ("spec",)))
        if not issuers:
            raise self.fail(("spec", "issuers"), "at least one issuer is required")
        seen: set[str] = set()
        for i, iss in enumerate(issuers):
            if iss.name in seen:
                raise self.fail(("spec", "issuers", i, "name"), f"duplicate issuer name {iss.name!r}")
            seen.add(iss.name)
        public_url = self.string(spec, "publicUrl", ("spec",)).rstrip("/")
        return IdpConfig(issuers=issuers, public_url=public_url, file=res.file)

    def issuer(self, path: FieldPath, d: dict[str, Any]) -> IssuerConfig:
        self.known(
            d,
            path,
            (
                "name", "issuer", "keys", "signingAlg", "audience", "accessTokenTtlSeconds",
                "idTokenTtlSeconds", "refreshTokenTtlSeconds", "codeTtlSeconds", "jwksMaxAgeSeconds",
                "login", "rotateRefreshTokens", "clockOffsetSeconds", "trustedClientCertHeader",
                "clients", "users",
            ),
        )  # fmt: skip
        name = self.string(d, "name", path)
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise self.fail((*path, "name"), "must be a non-empty name of letters, digits, '-', '_' or '.'")
        keys = tuple(self.key(p, k) for p, k in self.items(d, "keys", path)) or (KeyConfig(),)
        signing_alg = self.choice(d, "signingAlg", path, keys[0].alg, SIGNING_ALGS)
        if signing_alg not in {k.alg for k in keys}:
            raise self.fail((*path, "signingAlg"), f"no key with alg {signing_alg} in keys")
        clients = tuple(self.client(p, c) for p, c in self.items(d, "clients", path))
        users = tuple(self.user(p, u) for p, u in self.items(d, "users", path))
        for label, values in (
            ("clientId", [c.client_id for c in clients]),
            ("username", [u.username for u in users]),
        ):
            dup = {v for v in values if values.count(v) > 1}
            if dup:
                raise self.fail(
                    (*path, "clients" if label == "clientId" else "users"), f"duplicate {label} {sorted(dup)}"
                )
        return IssuerConfig(
            name=name,
            issuer=self.string(d, "issuer", path).rstrip("/"),
            keys=keys,
            signing_alg=signing_alg,
            audience=self.strings(d, "audience", path),
            access_token_ttl=self.number(d, "accessTokenTtlSeconds", path, DEFAULT_ACCESS_TOKEN_TTL),
            id_token_ttl=self.number(d, "idTokenTtlSeconds", path, DEFAULT_ID_TOKEN_TTL),
            refresh_token_ttl=self.number(d, "refreshTokenTtlSeconds", path, DEFAULT_REFRESH_TOKEN_TTL),
            code_ttl=self.number(d, "codeTtlSeconds", path, DEFAULT_CODE_TTL),
            jwks_max_age=int(self.number(d, "jwksMaxAgeSeconds", path, DEFAULT_JWKS_MAX_AGE, minimum=0)),
            login=self.choice(d, "login", path, "auto", LOGIN_MODES),
            rotate_refresh_tokens=self.boolean(d, "rotateRefreshTokens", path, True),
            clock_offset=self.number(d, "clockOffsetSeconds", path, 0.0, minimum=-(10**10)),
            trusted_client_cert_header=self.string(d, "trustedClientCertHeader", path).lower(),
            clients=clients,
            users=users,
        )

    def key(self, path: FieldPath, d: dict[str, Any]) -> KeyConfig:
        self.known(d, path, ("alg", "kid"))
        return KeyConfig(
            alg=self.choice(d, "alg", path, DEFAULT_SIGNING_ALG, SIGNING_ALGS),
            kid=self.string(d, "kid", path),
        )

    def client(self, path: FieldPath, d: dict[str, Any]) -> ClientConfig:
        self.known(
            d,
            path,
            (
                "clientId", "clientSecret", "authMethod", "grantTypes", "redirectUris", "audience", "scopes",
                "claims", "accessTokenFormat", "tlsThumbprints",
            ),
        )  # fmt: skip
        client_id = self.string(d, "clientId", path)
        if not client_id:
            raise self.fail((*path, "clientId"), "is required")
        auth_method = self.choice(d, "authMethod", path, "client_secret_basic", CLIENT_AUTH_METHODS)
        secret = self.string(d, "clientSecret", path)
        generated = auth_method.startswith("client_secret") and not secret
        if generated:
            secret = secrets.token_urlsafe(24)  # generated at start; never a hard-coded secret
        grant_types = self.strings(d, "grantTypes", path, GRANT_TYPES)
        for i, g in enumerate(grant_types):
            if g not in GRANT_TYPES:
                raise self.fail((*path, "grantTypes", i), f"must be one of {', '.join(GRANT_TYPES)}")
        if auth_method == "none" and "client_credentials" in grant_types and "grantTypes" in d:
            raise self.fail(
                (*path, "grantTypes"), "a public client (authMethod none) cannot use client_credentials"
            )
        if auth_method == "none":
            grant_types = tuple(g for g in grant_types if g != "client_credentials")
        return ClientConfig(
            client_id=client_id,
            client_secret=secret,
            auth_method=auth_method,
            grant_types=grant_types,
            redirect_uris=self.strings(d, "redirectUris", path),
            audience=self.strings(d, "audience", path),
            scopes=self.strings(d, "scopes", path),
            claims=self.claims(d, "claims", path),
            access_token_format=self.choice(d, "accessTokenFormat", path, "jwt", ACCESS_TOKEN_FORMATS),
            tls_thumbprints=self.strings(d, "tlsThumbprints", path),
            secret_generated=generated,
        )

    def user(self, path: FieldPath, d: dict[str, Any]) -> UserConfig:
        self.known(d, path, ("username", "password", "sub", "claims"))
        username = self.string(d, "username", path)
        if not username:
            raise self.fail((*path, "username"), "is required")
        return UserConfig(
            username=username,
            password=self.string(d, "password", path),
            sub=self.string(d, "sub", path),
            claims=self.claims(d, "claims", path),
        )

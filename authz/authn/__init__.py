"""JWT authentication with Istio ``RequestAuthentication`` semantics (spec §3).

``model`` parses the Istio kind, ``settings`` our per-issuer extension kind, ``credentials`` finds
tokens, ``jwt`` verifies them (pure), ``jwks``/``oidc``/``introspection`` fetch what verification
needs, and ``authenticator`` ties them together for the engine.
"""

from __future__ import annotations

from authz.authn.authenticator import Authenticator, AuthnResult, claim_headers
from authz.authn.jwk import Jwk, KeySet, parse_jwks
from authz.authn.jwt import VerifiedToken, verify
from authz.authn.model import (
    ClaimToHeader,
    JwtHeader,
    JwtRule,
    RequestAuthentication,
    jwt_rules_for,
    load_request_authentications,
)
from authz.authn.settings import (
    AuthnSettings,
    CertificateBinding,
    IssuerSettings,
    SpiffeBinding,
    load_issuer_settings,
    resolve_secrets,
)

__all__ = [
    "Authenticator",
    "AuthnResult",
    "AuthnSettings",
    "CertificateBinding",
    "ClaimToHeader",
    "IssuerSettings",
    "Jwk",
    "JwtHeader",
    "JwtRule",
    "KeySet",
    "RequestAuthentication",
    "SpiffeBinding",
    "VerifiedToken",
    "claim_headers",
    "jwt_rules_for",
    "load_issuer_settings",
    "load_request_authentications",
    "parse_jwks",
    "resolve_secrets",
    "verify",
]

"""A mock OpenID Provider for development, demos and tests (never production).

Several issuers on one server, the client_credentials, authorization code + PKCE, refresh and password
grants, introspection, revocation, key rotation on demand, run-time users/claims, a clock offset and fault
injection, all configured by one YAML file. See :mod:`authz.idp.mint` for the test helpers.
"""

from __future__ import annotations

from authz.idp.config import IdpConfig, default_config, parse_config
from authz.idp.issuer import Issuer
from authz.idp.provider import Idp
from authz.idp.server import RunningIdp, TlsFiles, running_idp

__all__ = [
    "Idp",
    "IdpConfig",
    "Issuer",
    "RunningIdp",
    "TlsFiles",
    "default_config",
    "parse_config",
    "running_idp",
]

"""RFC 7636 Proof Key for Code Exchange, on top of authlib's S256 helper."""

from __future__ import annotations

import hmac
import re

from authlib.oauth2.rfc7636 import create_s256_code_challenge

from authz.idp.rfc6749 import OAuthError

__all__ = ["SUPPORTED_METHODS", "check_challenge", "verify"]

SUPPORTED_METHODS = (
    "S256",
)  # "plain" is allowed by RFC 7636 but pointless; RFC 9700 section 2.1.1 says S256

# RFC 7636 section 4.1: code-verifier = 43*128unreserved; section 4.2: the S256 challenge is 43 chars.
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def check_challenge(challenge: str, method: str) -> None:
    """RFC 7636 section 4.3/4.4: the authorization request's ``code_challenge`` and its method."""
    if method not in SUPPORTED_METHODS:
        raise OAuthError("invalid_request", "code_challenge_method must be S256")
    if not _VERIFIER.fullmatch(challenge) or len(challenge) != 43:
        raise OAuthError("invalid_request", "code_challenge is not a S256 challenge")


def verify(verifier: str, challenge: str) -> None:
    """RFC 7636 section 4.6: BASE64URL(SHA256(ASCII(code_verifier))) == code_challenge, else invalid_grant."""
    if not _VERIFIER.fullmatch(verifier):
        raise OAuthError("invalid_grant", "code_verifier is malformed")
    if not hmac.compare_digest(create_s256_code_challenge(verifier), challenge):
        raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")

"""RFC 6749 wire details, pure: error responses, form bodies and HTTP Basic client credentials.

Every refusal the token, introspection and revocation endpoints make is an :class:`OAuthError`, which
knows its RFC 6749 section 5.2 JSON body, its status code and, for ``invalid_client`` over Basic auth,
its ``WWW-Authenticate`` challenge.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus

from authz.errors import AuthzError

__all__ = [
    "MAX_FORM_BYTES",
    "BasicCredentials",
    "OAuthError",
    "invalid_client",
    "parse_basic_authorization",
    "parse_form",
]

MAX_FORM_BYTES = 64 * 1024  # a token request is a few hundred bytes; anything this large is an attack


class OAuthError(AuthzError):
    """An RFC 6749 section 5.2 error response. ``reason`` is the ``error`` code (already snake_case)."""

    def __init__(
        self,
        error: str,
        description: str = "",
        *,
        status: int = 400,
        www_authenticate: str = "",
    ) -> None:
        super().__init__(description or error, reason=error)
        self.error = error
        self.description = description
        self.status = status
        self.www_authenticate = www_authenticate

    def body(self) -> dict[str, str]:
        out = {"error": self.error}
        if self.description:
            out["error_description"] = self.description
        return out

    def headers(self) -> dict[str, str]:
        # RFC 6749 section 5.1: responses carrying tokens or errors MUST NOT be cached.
        out = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.www_authenticate:
            out["WWW-Authenticate"] = self.www_authenticate
        return out


def invalid_client(description: str, *, basic: bool) -> OAuthError:
    """RFC 6749 section 5.2: ``invalid_client`` is 401, with a challenge when the client used Basic auth."""
    challenge = 'Basic realm="token", charset="UTF-8"' if basic else ""
    return OAuthError("invalid_client", description, status=401, www_authenticate=challenge)


def parse_form(body: bytes, content_type: str) -> dict[str, str]:
    """RFC 6749 section 3.2 / 4.1.3: an ``application/x-www-form-urlencoded`` UTF-8 body.

    Parameters sent without a value are treated as omitted, and parameters MUST NOT be included more
    than once (section 3.1 / 3.2). Anything else is ``invalid_request``.
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    if len(body) > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", "the body is too large")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError("invalid_request", "the body is not a valid form") from exc
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise OAuthError("invalid_request", f"parameter {name!r} is repeated")
        if value:
            out[name] = value
    return out


@dataclass(frozen=True)
class BasicCredentials:
    client_id: str
    client_secret: str


def parse_basic_authorization(header: str) -> BasicCredentials | None:
    """RFC 6749 section 2.3.1 + RFC 7617: ``Basic base64(urlencode(id) ":" urlencode(secret))``.

    Returns None when the header is not Basic; raises ``invalid_client`` when it is Basic but malformed.
    """
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise invalid_client("malformed Basic credentials", basic=True) from exc
    if ":" not in decoded:
        raise invalid_client("malformed Basic credentials", basic=True)
    raw_id, _, raw_secret = decoded.partition(":")
    return BasicCredentials(unquote_plus(raw_id), unquote_plus(raw_secret))

"""One shallow exception tree, rooted at :class:`AuthzError`.

Every error carries a short, stable, snake_case ``reason`` that machines can switch on (metrics labels,
decision logs, JSON deny bodies). Three families:

* :class:`ConfigError`: our operator's mistake, fatal at load time, names ``file:line:field``.
* :class:`CredentialError`: the caller's mistake, becomes a 401 (with ``WWW-Authenticate``) or a 403.
* :class:`DependencyError`: something we depend on (IdP, JWKS endpoint) is unavailable; we fail closed.

A deny is a returned :class:`authz.decision.Decision`, never an exception escaping to a front.
Foreign exceptions (grpc, ssl, cryptography, httpx) are translated into these at the boundary only.
"""

from __future__ import annotations

__all__ = [
    "AuthzError",
    "ConfigError",
    "ConfigErrors",
    "CredentialError",
    "DependencyError",
    "MalformedRequest",
]


class AuthzError(Exception):
    """Root of every error meshauthz raises on purpose."""

    reason: str = "authz_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class ConfigError(AuthzError):
    """A configuration or policy file is wrong. ``str()`` is ``file:line: field: message``."""

    reason = "invalid_config"

    def __init__(
        self,
        message: str,
        *,
        file: str = "",
        line: int = 0,
        field: str = "",
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.file = file
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line:
            where += f":{self.line}"
        what = f"{self.field}: " if self.field else ""
        return f"{where}: {what}{self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "reason": self.reason,
            "message": self.message,
        }


class ConfigErrors(AuthzError):
    """Several :class:`ConfigError` found in one load; raised so that all of them are reported at once."""

    reason = "invalid_config"

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors) or "invalid configuration")


class CredentialError(AuthzError):
    """The caller's credentials are missing, malformed, forged, expired or not allowed.

    ``status`` is 401 (authentication failed, RFC 6750 ``invalid_token``) or 403 (authenticated but
    not allowed, e.g. an audience mismatch, as Envoy's jwt_authn does).
    """

    reason = "invalid_token"
    status = 401

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message, reason=reason)
        if status is not None:
            self.status = status

    @property
    def www_authenticate(self) -> str:
        """The RFC 6750 section 3 challenge for this error."""
        error = "invalid_token" if self.status == 401 else "insufficient_scope"
        desc = _quote_auth_param(self.message)
        return f'Bearer error="{error}", error_description="{desc}"'


class DependencyError(AuthzError):
    """An IdP, JWKS endpoint or other dependency is unreachable or answered nonsense."""

    reason = "dependency_unavailable"


class MalformedRequest(AuthzError):
    """The CheckRequest (or proxied request) itself cannot be interpreted; it is denied."""

    reason = "malformed_request"


def _quote_auth_param(text: str) -> str:
    """RFC 6750 section 3: error_description is limited to %x20-21 / %x23-5B / %x5D-7E."""
    out = []
    for ch in text[:200]:
        o = ord(ch)
        if ch in '"\\' or o < 0x20 or o > 0x7E:
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)

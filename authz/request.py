"""The one internal request value every front builds and the engine reads.

Fronts (gRPC ext_authz, HTTP ext_authz, the bundled proxy) translate what they receive into a
:class:`Request`; nothing downstream of them knows which front it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["EMPTY_MAP", "HttpAttributes", "Peer", "Request", "RequestAuth", "Workload"]

EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of the downstream connection.

    ``principal`` is a verified SPIFFE ID URI (``spiffe://td/ns/n/sa/s``) or ``""`` when the
    connection was not mTLS (or the identity source was not trusted). ``certificate`` is the peer's
    leaf certificate as PEM text (already URL-decoded), or ``""``.
    """

    address: str = ""
    port: int = 0
    principal: str = ""
    certificate: str = ""


@dataclass(frozen=True, slots=True)
class HttpAttributes:
    """HTTP attributes of a request. Header names are lower case; duplicates are joined with ``,``.

    ``path`` is the raw ``:path`` as received (query and fragment included, not yet normalized).
    """

    method: str = "GET"
    host: str = ""
    path: str = "/"
    scheme: str = "http"
    protocol: str = "HTTP/1.1"
    headers: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    id: str = ""
    body: bytes = b""
    validated: bool = False
    """The front's HTTP parser already rejected what Envoy's codecs reject (bad method or header
    names, CR/LF/NUL in values), so the engine need not check again."""


@dataclass(frozen=True, slots=True)
class Request:
    """What is being authorized. ``http is None`` means a TCP (network filter) check."""

    source: Peer = field(default_factory=Peer)
    destination: Peer = field(default_factory=Peer)
    http: HttpAttributes | None = None
    sni: str = ""
    context_extensions: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    metadata: Mapping[str, Any] = field(default_factory=lambda: EMPTY_MAP)
    remote_ip: str = ""
    """Original client IP (``remote.ip``): derived from X-Forwarded-For by the front, or source.address."""


@dataclass(frozen=True, slots=True)
class Workload:
    """The destination workload a request is for: its namespace and labels (Istio selector scope)."""

    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """A verified request credential (JWT payload), what Istio calls ``request.auth.*``.

    ``claims`` is the full verified payload. ``space_delimited`` names the claims whose string values
    are split on whitespace for authorization matching (``scope``, ``permission`` and the rule's
    ``spaceDelimitedClaims``), per Istio's RequestAuthentication.
    """

    claims: Mapping[str, Any]
    space_delimited: frozenset[str] = frozenset({"scope", "permission"})

    @property
    def issuer(self) -> str:
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else ""

    @property
    def subject(self) -> str:
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else ""

    @property
    def principal(self) -> str:
        """``iss/sub`` when both are present (Istio's request principal), else ``""``."""
        if self.issuer and self.subject:
            return f"{self.issuer}/{self.subject}"
        return ""

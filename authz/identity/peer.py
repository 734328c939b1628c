"""Who is the peer? Resolve one identity from the sources a request carries, in order of trust.

1. ``request.source.principal``: the URI SAN Envoy took from a client certificate it verified itself
   (Envoy ``AttributeContext.Peer.principal``; set only when the listener has a ``validation_context``).
   When ``request.source.certificate`` is present too, its URI SAN must name the same SPIFFE ID.
2. ``request.source.certificate`` alone: Envoy did not verify it (no principal), so it is used only when a
   trust bundle is configured and the certificate chains to it (X.509-SVID §5.2).
3. ``x-forwarded-client-cert``: only when explicitly trusted (``PeerTrust.trust_xfcc``), because any
   client can send the header unless a proxy in front sanitizes it (Envoy ``forward_client_cert_details:
   SANITIZE_SET``; istio-authz spec §2.1 "trust XFCC only from a sanitizing proxy").

The first source that is present decides: when it is unusable there is no identity (fail closed), and a
less trusted source is never consulted as a fallback nor merged with a more trusted one. Each source
that was present but unusable is listed in :attr:`PeerIdentity.rejected` with its reason, for the trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509

from authz.errors import ConfigError, CredentialError
from authz.identity.certs import (
    XFCC_HEADER,
    InvalidPeerCertificate,
    PeerCertificate,
    XfccElement,
    check_certificate_validity,
    load_peer_certificate,
    load_trust_bundle,
    parse_xfcc,
    spiffe_id_of,
    thumbprint_from_hex_hash,
    verify_certificate_chain,
)
from authz.identity.spiffe import SCHEME_PREFIX, InvalidSpiffeId, SpiffeId, validate_trust_domain
from authz.request import Request

__all__ = [
    "PeerIdentity",
    "PeerSource",
    "PeerTrust",
    "RejectedSource",
    "identity_is_timeless",
    "resolve_peer_identity",
]

PeerSource = Literal["principal", "certificate", "xfcc", "none"]


@dataclass(frozen=True)
class PeerTrust:
    """What the authorizer trusts about peer identity. The defaults trust only Envoy's verified principal.

    * ``trust_xfcc``: accept ``x-forwarded-client-cert`` (off by default: only a sanitizing proxy in
      front makes it trustworthy).
    * ``trust_bundle``: root certificates of the local trust domain. When set, every certificate we see
      (``source.certificate``, XFCC ``Cert``) must chain to one of them, and a certificate without
      Envoy's principal becomes usable.
    * ``trust_domain`` / ``trust_domain_aliases``: the local trust domain. When set, identities proven
      by ``trust_bundle`` must belong to it (a bundle vouches for its own trust domain only, X.509-SVID
      §5.2), and an XFCC ``By`` (the sanitizing proxy's own ID) must belong to it.
    """

    trust_xfcc: bool = False
    trust_bundle: tuple[x509.Certificate, ...] = ()
    trust_domain: str = ""
    trust_domain_aliases: tuple[str, ...] = ()
    xfcc_header: str = XFCC_HEADER
    xfcc_key: str = field(init=False, repr=False, compare=False)
    """``xfcc_header`` lower-cased, as the fronts key headers."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "xfcc_key", self.xfcc_header.lower())
        for td in (self.trust_domain, *self.trust_domain_aliases):
            if td:
                try:
                    validate_trust_domain(td)
                except InvalidSpiffeId as exc:
                    raise ConfigError(exc.message, field="trust_domain", reason=exc.reason) from exc

    @classmethod
    def from_pem(
        cls,
        *,
        trust_bundle_pem: str | bytes = b"",
        trust_domain: str = "",
        trust_domain_aliases: Sequence[str] = (),
        trust_xfcc: bool = False,
    ) -> PeerTrust:
        """Build from PEM roots (``ConfigError`` ``invalid_trust_bundle`` when they do not parse)."""
        roots = load_trust_bundle(trust_bundle_pem) if trust_bundle_pem else ()
        return cls(
            trust_xfcc=trust_xfcc,
            trust_bundle=roots,
            trust_domain=trust_domain,
            trust_domain_aliases=tuple(trust_domain_aliases),
        )

    def is_local(self, trust_domain: str) -> bool:
        """True when no local trust domain is configured, or ``trust_domain`` is it or an alias."""
        if not self.trust_domain:
            return True
        return trust_domain == self.trust_domain or trust_domain in self.trust_domain_aliases


@dataclass(frozen=True, slots=True)
class RejectedSource:
    """A source that was present but not used, and why (``reason`` is a stable snake_case code)."""

    source: str
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The resolved peer. ``principal`` is the full ``spiffe://`` URI, or ``""`` when there is none.

    ``certificate_thumbprint`` is the RFC 8705 §3.1 ``x5t#S256`` of the peer's leaf when one is known.
    """

    principal: str = ""
    certificate_thumbprint: str = ""
    source: PeerSource = "none"
    rejected: tuple[RejectedSource, ...] = ()
    spiffe_id: SpiffeId | None = None

    @property
    def authenticated(self) -> bool:
        return bool(self.principal)

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id.trust_domain if self.spiffe_id else ""

    @property
    def namespace(self) -> str:
        return self.spiffe_id.namespace if self.spiffe_id else ""

    @property
    def service_account(self) -> str:
        return self.spiffe_id.service_account if self.spiffe_id else ""

    @property
    def reason(self) -> str:
        """The reason of the first rejected source, or ``""``."""
        return self.rejected[0].reason if self.rejected else ""


class _Rejected(Exception):
    def __init__(self, source: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.rejection = RejectedSource(source, reason, message)


def _reject(source: str, exc: CredentialError) -> _Rejected:
    return _Rejected(source, exc.reason, exc.message)


def _checked_certificate(source: str, cert: PeerCertificate, trust: PeerTrust, now: float) -> SpiffeId:
    """Validity (RFC 5280 §4.1.2.5), one SPIFFE URI SAN (X.509-SVID §2), chain to the bundle if any (§5.2)."""
    try:
        check_certificate_validity(cert, now=now)
        sid = spiffe_id_of(cert)
        if trust.trust_bundle:
            verify_certificate_chain(cert, trust.trust_bundle, now=now)
    except InvalidPeerCertificate as exc:
        raise _reject(source, exc) from exc
    if trust.trust_bundle and not trust.is_local(sid.trust_domain):
        raise _Rejected(
            source,
            "trust_domain_not_trusted",
            f"{sid} is not in the trust domain {trust.trust_domain!r} the trust bundle vouches for",
        )
    return sid


def _load(source: str, text: str) -> PeerCertificate:
    try:
        return load_peer_certificate(text)
    except InvalidPeerCertificate as exc:
        raise _reject(source, exc) from exc


def _parse_principal(principal: str) -> SpiffeId:
    if not principal.startswith(SCHEME_PREFIX):
        raise _Rejected(
            "principal", "principal_not_spiffe", f"the peer principal is not a SPIFFE ID: {principal[:80]!r}"
        )
    try:
        return SpiffeId.parse(principal)
    except InvalidSpiffeId as exc:
        raise _reject("principal", exc) from exc


def _from_principal(request: Request, trust: PeerTrust, now: float) -> PeerIdentity:
    sid = _parse_principal(request.source.principal)
    thumbprint = ""
    if request.source.certificate:
        cert = _load("certificate", request.source.certificate)
        cert_sid = _checked_certificate("certificate", cert, trust, now)
        if cert_sid != sid:
            raise _Rejected(
                "certificate",
                "principal_certificate_mismatch",
                f"the certificate names {cert_sid} but Envoy's principal is {sid}",
            )
        thumbprint = cert.thumbprint
    return PeerIdentity(
        principal=str(sid), certificate_thumbprint=thumbprint, source="principal", spiffe_id=sid
    )


def _from_certificate(request: Request, trust: PeerTrust, now: float) -> PeerIdentity:
    if not trust.trust_bundle:
        raise _Rejected(
            "certificate",
            "certificate_unverified",
            "a peer certificate without Envoy's principal needs a configured trust bundle",
        )
    cert = _load("certificate", request.source.certificate)
    sid = _checked_certificate("certificate", cert, trust, now)
    return PeerIdentity(
        principal=str(sid), certificate_thumbprint=cert.thumbprint, source="certificate", spiffe_id=sid
    )


def _xfcc_uri(element: XfccElement) -> SpiffeId:
    if not element.uris:
        raise _Rejected("xfcc", "xfcc_no_uri", "the x-forwarded-client-cert element has no URI")
    if len(element.uris) > 1:
        raise _Rejected(
            "xfcc", "xfcc_multiple_uris", f"the x-forwarded-client-cert element has {len(element.uris)} URIs"
        )
    uri = element.uris[0]
    if not uri.startswith(SCHEME_PREFIX):
        raise _Rejected("xfcc", "xfcc_uri_not_spiffe", f"the XFCC URI is not a SPIFFE ID: {uri[:80]!r}")
    try:
        return SpiffeId.parse(uri)
    except InvalidSpiffeId as exc:
        raise _reject("xfcc", exc) from exc


def _from_xfcc(value: str, trust: PeerTrust, now: float) -> PeerIdentity:
    try:
        elements = parse_xfcc(value)
    except CredentialError as exc:
        raise _reject("xfcc", exc) from exc
    if len(elements) != 1:
        # A duplicated header (joined with ',' by the front) or an APPEND_FORWARD chain: which hop is the
        # peer is ambiguous, and the earlier hops were asserted by proxies we do not know.
        raise _Rejected(
            "xfcc",
            "xfcc_multiple_elements",
            f"x-forwarded-client-cert has {len(elements)} elements (duplicated header or forwarded chain);"
            " exactly one is accepted",
        )
    element = elements[0]
    if element.by and trust.trust_domain:
        try:
            by = SpiffeId.parse(element.by)
        except InvalidSpiffeId as exc:
            raise _Rejected(
                "xfcc", "xfcc_by_not_spiffe", f"XFCC By is not a SPIFFE ID: {exc.message}"
            ) from exc
        if not trust.is_local(by.trust_domain):
            raise _Rejected(
                "xfcc", "xfcc_by_foreign_trust_domain", f"XFCC By {by} is not in the local trust domain"
            )
    sid = _xfcc_uri(element)
    thumbprint = ""
    if element.cert:
        cert = _load("xfcc", element.cert)
        cert_sid = _checked_certificate("xfcc", cert, trust, now)
        if cert_sid != sid:
            raise _Rejected(
                "xfcc", "xfcc_uri_certificate_mismatch", f"XFCC Cert names {cert_sid} but URI is {sid}"
            )
        if element.hash and element.hash != cert.sha256_hex:
            raise _Rejected("xfcc", "xfcc_hash_mismatch", "XFCC Hash is not the SHA-256 of Cert")
        thumbprint = cert.thumbprint
    elif element.hash:
        thumbprint = thumbprint_from_hex_hash(element.hash)
    return PeerIdentity(principal=str(sid), certificate_thumbprint=thumbprint, source="xfcc", spiffe_id=sid)


_NO_IDENTITY = PeerIdentity()

# Principals whose resolution (a SPIFFE ID parse, a pure function of the string) is kept: a mesh has as
# many as it has service accounts calling this workload. Dropped whole when full.
MAX_CACHED_PRINCIPALS = 4096
_principals: dict[str, PeerIdentity | RejectedSource] = {}


def _from_principal_only(principal: str) -> PeerIdentity:
    """:func:`_from_principal` for a request without a certificate, memoized by principal."""
    found = _principals.get(principal)
    if found is None:
        try:
            sid = _parse_principal(principal)
            found = PeerIdentity(principal=str(sid), source="principal", spiffe_id=sid)
        except _Rejected as rej:
            found = rej.rejection
        if len(_principals) >= MAX_CACHED_PRINCIPALS:
            _principals.clear()
        _principals[principal] = found
    if isinstance(found, RejectedSource):
        raise _Rejected(found.source, found.reason, found.message)
    return found


def identity_is_timeless(request: Request, trust: PeerTrust) -> bool:
    """Whether :func:`resolve_peer_identity` gives ``request`` the same identity at any ``now``: it reads
    the clock only to check a certificate (``source.certificate``, XFCC), so without either it is a
    function of the request and ``trust`` alone."""
    http = request.http
    return not request.source.certificate and (http is None or trust.xfcc_key not in http.headers)


def resolve_peer_identity(request: Request, *, trust: PeerTrust, now: float) -> PeerIdentity:
    """Resolve the peer identity of ``request`` (see the module docstring for the order of trust).

    Never raises for bad input: unusable sources become :class:`RejectedSource` entries and the identity
    is then empty (``principal == ""``).
    """
    headers = request.http.headers if request.http is not None else {}
    xfcc_value = headers.get(trust.xfcc_key)
    source = request.source
    rejected: list[RejectedSource] = []
    identity = _NO_IDENTITY
    try:
        if source.principal:
            if source.certificate:
                identity = _from_principal(request, trust, now)
            else:
                identity = _from_principal_only(source.principal)
        elif source.certificate:
            identity = _from_certificate(request, trust, now)
        elif xfcc_value is not None and trust.trust_xfcc:
            identity = _from_xfcc(xfcc_value, trust, now)
    except _Rejected as rej:
        rejected.append(rej.rejection)
    if xfcc_value is not None and not trust.trust_xfcc:
        rejected.append(
            RejectedSource(
                "xfcc", "xfcc_untrusted", "x-forwarded-client-cert is ignored: XFCC is not trusted"
            )
        )
    if not rejected:
        return identity
    return PeerIdentity(
        principal=identity.principal,
        certificate_thumbprint=identity.certificate_thumbprint,
        source=identity.source,
        rejected=tuple(rejected),
        spiffe_id=identity.spiffe_id,
    )

"""Peer certificates and the ``x-forwarded-client-cert`` header: parsing, checking, extracting SPIFFE IDs.

Pure functions with ``now`` (seconds since the epoch) passed in. Every failure is an
:class:`InvalidPeerCertificate` or :class:`InvalidXfcc` (both :class:`~authz.errors.CredentialError`)
with a snake_case ``reason``; foreign exceptions from ``cryptography`` are translated here.

Sources:

* Envoy ``ext_authz`` ``AttributeContext.Peer.certificate``: "The X.509 certificate used to authenticate
  the identify of this peer ... URL encoded PEM", set with ``include_peer_certificate``.
* X.509-SVID §2 (``spiffe/spiffe`` ``standards/X509-SVID.md``): "An X.509 SVID MUST contain exactly one URI
  SAN"; §5 validation against the trust domain's bundle.
* RFC 8705 §3.1: the ``x5t#S256`` confirmation is the base64url SHA-256 of the DER certificate.
* Envoy ``config/http/http_conn_man/headers`` "x-forwarded-client-cert": elements separated by ``,``;
  pairs by ``;``; ``key=value``; keys case-insensitive (``By``, ``Hash``, ``Cert``, ``Chain``, ``Subject``,
  ``URI``, ``DNS``); values containing ``,;=`` are double-quoted with ``"`` escaped as ``\\"``; ``Cert``
  and ``Chain`` are URL-encoded PEM; ``Hash`` is the hex SHA-256 of the DER certificate; ``URI`` and
  ``DNS`` repeat once per SAN.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from authz.errors import ConfigError, CredentialError
from authz.identity.spiffe import SCHEME_PREFIX, InvalidSpiffeId, SpiffeId

__all__ = [
    "MAX_CERTIFICATE_PEM_BYTES",
    "MAX_XFCC_BYTES",
    "MAX_XFCC_ELEMENTS",
    "XFCC_HEADER",
    "InvalidPeerCertificate",
    "InvalidXfcc",
    "PeerCertificate",
    "XfccElement",
    "certificate_thumbprint",
    "check_certificate_validity",
    "decode_peer_certificate",
    "load_peer_certificate",
    "load_trust_bundle",
    "parse_xfcc",
    "spiffe_id_of",
    "thumbprint_from_hex_hash",
    "verify_certificate_chain",
]

XFCC_HEADER = "x-forwarded-client-cert"
MAX_CERTIFICATE_PEM_BYTES = 64 * 1024  # a leaf plus a few intermediates; anything larger is not a peer cert
MAX_XFCC_BYTES = 64 * 1024  # Envoy's default max_request_headers_kb is 60 KiB for all headers together
MAX_XFCC_ELEMENTS = 32  # one element per proxy hop; real chains are a handful of hops

_HEX = frozenset("0123456789abcdefABCDEF")


class InvalidPeerCertificate(CredentialError):
    """A peer certificate is malformed, expired, untrusted or names no (single) SPIFFE ID."""

    reason = "invalid_peer_certificate"


class InvalidXfcc(CredentialError):
    """An ``x-forwarded-client-cert`` header is malformed or ambiguous."""

    reason = "xfcc_malformed"


# ---------------------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """A parsed peer leaf certificate and the intermediates that came with it (possibly none)."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def der(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.DER)

    @property
    def thumbprint(self) -> str:
        """RFC 8705 §3.1 ``x5t#S256``: base64url (no padding) of the SHA-256 of the DER leaf."""
        return certificate_thumbprint(self.leaf)

    @property
    def sha256_hex(self) -> str:
        """Hex SHA-256 of the DER leaf: what Envoy puts in XFCC ``Hash=``."""
        return hashlib.sha256(self.der).hexdigest()

    @property
    def uri_sans(self) -> tuple[str, ...]:
        return _uri_sans(self.leaf)


def certificate_thumbprint(cert: x509.Certificate) -> str:
    """RFC 8705 §3.1: ``x5t#S256`` = base64url(SHA-256(DER(cert))) without padding (RFC 7515 §2)."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def thumbprint_from_hex_hash(hex_hash: str) -> str:
    """Turn an XFCC ``Hash`` (hex SHA-256 of the DER cert) into the RFC 8705 ``x5t#S256`` form."""
    if len(hex_hash) != 64 or not set(hex_hash) <= _HEX:
        raise InvalidXfcc(f"Hash is not a hex SHA-256 digest: {hex_hash[:80]!r}", reason="xfcc_bad_hash")
    return base64.urlsafe_b64encode(bytes.fromhex(hex_hash)).rstrip(b"=").decode("ascii")


def decode_peer_certificate(text: str | bytes) -> str:
    """Undo the URL encoding Envoy applies to ``source.certificate`` and XFCC ``Cert``/``Chain``.

    Decoding is always safe: PEM (base64 and the ``-----BEGIN CERTIFICATE-----`` armour) never contains
    ``%``, so an already-decoded PEM is returned unchanged. ``+`` is not a space here (Envoy encodes it as
    ``%2B``), hence ``unquote``, not ``unquote_plus``.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    return unquote(text, errors="replace")


def load_peer_certificate(text: str | bytes) -> PeerCertificate:
    """Parse a (possibly URL-encoded) PEM peer cert: first block is the leaf, the rest its chain."""
    if len(text) > MAX_CERTIFICATE_PEM_BYTES:
        raise InvalidPeerCertificate("the peer certificate is too large", reason="certificate_malformed")
    pem = decode_peer_certificate(text)
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise InvalidPeerCertificate("no PEM certificate found", reason="certificate_malformed")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii", "replace"))
    except ValueError as exc:
        raise InvalidPeerCertificate(
            f"the peer certificate is not valid PEM: {exc}", reason="certificate_malformed"
        ) from exc
    return PeerCertificate(leaf=certs[0], intermediates=tuple(certs[1:]))


def _uri_sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    except ValueError as exc:  # a malformed extension surfaces lazily
        raise InvalidPeerCertificate(
            f"unreadable subjectAltName: {exc}", reason="certificate_malformed"
        ) from exc
    return tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate | PeerCertificate) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID: its one URI SAN (X.509-SVID §2 "exactly one URI SAN").

    Reasons: ``certificate_no_uri_san``, ``certificate_multiple_uri_sans``, ``certificate_uri_not_spiffe``
    (another scheme), ``certificate_invalid_spiffe_id`` (``spiffe://`` but malformed).
    """
    leaf = cert.leaf if isinstance(cert, PeerCertificate) else cert
    uris = _uri_sans(leaf)
    if not uris:
        raise InvalidPeerCertificate("the certificate has no URI SAN", reason="certificate_no_uri_san")
    if len(uris) > 1:
        raise InvalidPeerCertificate(
            f"the certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one",
            reason="certificate_multiple_uri_sans",
        )
    uri = uris[0]
    if not uri.lower().startswith(SCHEME_PREFIX):
        raise InvalidPeerCertificate(
            f"the URI SAN is not a SPIFFE ID: {uri[:80]!r}", reason="certificate_uri_not_spiffe"
        )
    try:
        return SpiffeId.parse(uri)
    except InvalidSpiffeId as exc:
        raise InvalidPeerCertificate(
            f"the URI SAN is not a valid SPIFFE ID ({exc.reason}): {exc.message}",
            reason="certificate_invalid_spiffe_id",
        ) from exc


def check_certificate_validity(cert: x509.Certificate | PeerCertificate, *, now: float) -> None:
    """RFC 5280 §4.1.2.5: ``notBefore <= now <= notAfter``.

    Reasons ``certificate_not_yet_valid``, ``certificate_expired``.
    """
    leaf = cert.leaf if isinstance(cert, PeerCertificate) else cert
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if now < not_before:
        raise InvalidPeerCertificate(
            f"the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}",
            reason="certificate_not_yet_valid",
        )
    if now > not_after:
        raise InvalidPeerCertificate(
            f"the certificate expired at {leaf.not_valid_after_utc.isoformat()}", reason="certificate_expired"
        )


def load_trust_bundle(pem: str | bytes) -> tuple[x509.Certificate, ...]:
    """Parse a PEM trust bundle (one or more root certificates); ``ConfigError`` when there are none."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        roots = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise ConfigError(
            f"the trust bundle is not PEM certificates: {exc}", reason="invalid_trust_bundle"
        ) from exc
    return roots


def verify_certificate_chain(cert: PeerCertificate, roots: Sequence[x509.Certificate], *, now: float) -> None:
    """X.509-SVID §5.2: the leaf must chain, through its intermediates, to one of ``roots`` at ``now``.

    Path validation is RFC 5280 as implemented by ``cryptography.x509.verification`` (client profile:
    the leaf needs ``clientAuth`` if it has an EKU). Reason ``certificate_untrusted`` on failure.
    """
    if not roots:
        raise InvalidPeerCertificate("no trust bundle is configured", reason="certificate_untrusted")
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(datetime.fromtimestamp(now, UTC))
        .build_client_verifier()
    )
    try:
        verifier.verify(cert.leaf, list(cert.intermediates))
    except (VerificationError, ValueError) as exc:
        raise InvalidPeerCertificate(
            f"the certificate is not signed by a trusted root: {exc}", reason="certificate_untrusted"
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# x-forwarded-client-cert


@dataclass(frozen=True, slots=True)
class XfccElement:
    """One XFCC element (one proxy hop). ``cert``/``chain`` are URL-decoded PEM; empty ``URI=`` is dropped."""

    by: str = ""
    hash: str = ""
    cert: str = ""
    chain: str = ""
    subject: str = ""
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()


_SINGLE_KEYS = {"by": "by", "hash": "hash", "cert": "cert", "chain": "chain", "subject": "subject"}
_REPEATED_KEYS = {"uri": "uris", "dns": "dns"}
_OWS = " \t"


def _malformed(message: str, at: int) -> InvalidXfcc:
    return InvalidXfcc(
        f"malformed x-forwarded-client-cert at offset {at}: {message}", reason="xfcc_malformed"
    )


def _parse_pairs(value: str) -> list[list[tuple[str, str, int]]]:
    """Tokenize into elements of ``(key, value, offset)``; quoted values unescaped (``\\"`` -> ``"``)."""
    elements: list[list[tuple[str, str, int]]] = []
    pairs: list[tuple[str, str, int]] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in _OWS:
            i += 1
        start = i
        while i < n and value[i] not in '=;,"':
            i += 1
        key = value[start:i].strip(_OWS)
        if i >= n or value[i] != "=":
            raise _malformed("expected key=value", start)
        if not key:
            raise _malformed("empty key", start)
        i += 1  # '='
        while i < n and value[i] in _OWS:
            i += 1
        if i < n and value[i] == '"':
            i += 1
            chars: list[str] = []
            while True:
                if i >= n:
                    raise _malformed("unterminated quoted value", start)
                ch = value[i]
                if ch == "\\" and i + 1 < n and value[i + 1] == '"':
                    chars.append('"')
                    i += 2
                    continue
                if ch == '"':
                    i += 1
                    break
                chars.append(ch)
                i += 1
            val = "".join(chars)
            while i < n and value[i] in _OWS:
                i += 1
            if i < n and value[i] not in ";,":
                raise _malformed("text after a quoted value", i)
        else:
            vstart = i
            while i < n and value[i] not in ";,":
                if value[i] in '="':
                    raise _malformed("'=' or '\"' in an unquoted value (it must be quoted)", i)
                i += 1
            val = value[vstart:i].strip(_OWS)
        pairs.append((key, val, start))
        if i >= n:
            elements.append(pairs)
            return elements
        sep = value[i]
        i += 1
        if sep == ",":
            elements.append(pairs)
            pairs = []
            if len(elements) >= MAX_XFCC_ELEMENTS:
                raise InvalidXfcc(
                    f"more than {MAX_XFCC_ELEMENTS} x-forwarded-client-cert elements",
                    reason="xfcc_too_many_elements",
                )
        if i >= n:
            raise _malformed(f"trailing {sep!r}", i - 1)


def parse_xfcc(value: str) -> tuple[XfccElement, ...]:
    """Parse an ``x-forwarded-client-cert`` value into its elements, in order (the last is the newest hop).

    Reasons: ``xfcc_empty``, ``xfcc_too_large``, ``xfcc_malformed`` (grammar), ``xfcc_too_many_elements``,
    ``xfcc_duplicate_key`` (``By``, ``Hash``, ``Cert``, ``Chain`` or ``Subject`` twice in one element),
    ``xfcc_bad_hash``. Unknown keys are accepted and ignored (forward compatibility).
    """
    if len(value) > MAX_XFCC_BYTES:
        raise InvalidXfcc(
            f"x-forwarded-client-cert is larger than {MAX_XFCC_BYTES} bytes", reason="xfcc_too_large"
        )
    if not value.strip(_OWS):
        raise InvalidXfcc("x-forwarded-client-cert is empty", reason="xfcc_empty")
    out: list[XfccElement] = []
    for pairs in _parse_pairs(value):
        single: dict[str, str] = {}
        repeated: dict[str, list[str]] = {"uris": [], "dns": []}
        for key, val, at in pairs:
            k = key.lower()
            if k in _SINGLE_KEYS:
                field = _SINGLE_KEYS[k]
                if field in single:
                    raise InvalidXfcc(
                        f"x-forwarded-client-cert key {key!r} repeated in one element (offset {at})",
                        reason="xfcc_duplicate_key",
                    )
                single[field] = decode_peer_certificate(val) if field in ("cert", "chain") else val
            elif k in _REPEATED_KEYS and val:
                repeated[_REPEATED_KEYS[k]].append(val)
        digest = single.get("hash", "")
        if digest and (len(digest) != 64 or not set(digest) <= _HEX):
            raise InvalidXfcc(f"Hash is not a hex SHA-256 digest: {digest[:80]!r}", reason="xfcc_bad_hash")
        out.append(
            XfccElement(
                by=single.get("by", ""),
                hash=digest.lower(),
                cert=single.get("cert", ""),
                chain=single.get("chain", ""),
                subject=single.get("subject", ""),
                uris=tuple(repeated["uris"]),
                dns=tuple(repeated["dns"]),
            )
        )
    return tuple(out)

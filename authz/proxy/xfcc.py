"""``x-forwarded-client-cert`` on the inbound listener, as Envoy's HTTP connection manager writes it.

Envoy ``ConnectionManagerUtility::mutateXfccRequestHeader`` (``source/common/http/conn_manager_utility.cc``)
with HCM ``forward_client_cert_details`` (DPA ``http_connection_manager.proto`` ``ForwardClientCertDetails``):

* ``ALWAYS_FORWARD_ONLY``: the client's header goes through untouched, on any connection.
* otherwise, on a connection that is not mutual TLS, or with ``SANITIZE``: the header is removed;
* ``FORWARD_ONLY`` (mTLS): forwarded untouched;
* ``APPEND_FORWARD`` (mTLS): this hop's element appended to the client's value after a ``,``;
* ``SANITIZE_SET`` (mTLS): the header replaced by this hop's element.

This hop's element is ``By=<each URI SAN of our certificate>;Hash=<hex SHA-256 of the peer's DER
certificate>`` followed by what ``set_current_client_cert_details`` asks for, in Envoy's order:
``Subject="<RFC 2253 subject>"`` (present even when empty), ``URI=<each URI SAN>`` (``URI=`` when none),
``DNS=<each DNS SAN>``; ``Cert="<URL-encoded PEM>"`` comes right after ``Hash`` when asked for.
istiod sets ``Subject``, ``URI`` and ``DNS`` on sidecar inbound listeners (istio
``pilot/pkg/networking/core/listener.go``) with ``APPEND_FORWARD``; our default is ``SANITIZE_SET`` so that a
client can never smuggle elements of its own. The format is checked against Envoy 1.40 in
``tests/integration/test_proxy_oracle_mtls.py``.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass

from cryptography import x509

from authz.proxy.settings import ClientCertDetails

__all__ = [
    "XFCC_HEADER",
    "ClientCertForwarding",
    "PeerCertificate",
    "certificate_uris",
    "peer_certificate",
    "url_encoded_pem",
]

XFCC_HEADER = "x-forwarded-client-cert"


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What an XFCC element says about a certificate."""

    sha256: str
    subject: str
    uris: tuple[str, ...]
    dns: tuple[str, ...]


def _sans(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    uris = tuple(ext.get_values_for_type(x509.UniformResourceIdentifier))
    return uris, tuple(ext.get_values_for_type(x509.DNSName))


def peer_certificate(pem: str) -> PeerCertificate:
    """Parse the peer's leaf certificate (PEM, as :class:`~authz.proxy.mtls.PeerIdentity` keeps it)."""
    der = ssl.PEM_cert_to_DER_cert(pem)
    cert = x509.load_der_x509_certificate(der)
    uris, dns = _sans(cert)
    # Envoy: X509_NAME_print_ex(..., XN_FLAG_RFC2253), most specific RDN first, as RFC 4514 strings are.
    return PeerCertificate(hashlib.sha256(der).hexdigest(), cert.subject.rfc4514_string(), uris, dns)


# Envoy ``ConnectionInfoImplBase::urlEncodedPemEncodedPeerCertificate``: the PEM with these five replaced.
_PEM_ESCAPES = str.maketrans({"\n": "%0A", " ": "%20", "+": "%2B", "/": "%2F", "=": "%3D"})


def url_encoded_pem(pem: str) -> str:
    """The peer certificate as XFCC's ``Cert`` carries it (Envoy's URL-encoded PEM)."""
    return pem.translate(_PEM_ESCAPES)


def certificate_uris(pem: bytes) -> tuple[str, ...]:
    """The URI SANs of the first certificate in ``pem`` (our own leaf: Envoy's ``uriSanLocalCertificate``)."""
    return _sans(x509.load_pem_x509_certificate(pem))[0]


class ClientCertForwarding:
    """One configuration generation's XFCC rule: ``apply(headers, peer_pem)`` returns the headers to forward.

    ``peer_pem`` is the verified peer certificate of a mutual-TLS connection, ``""`` on any other.
    """

    def __init__(self, details: ClientCertDetails, own_uris: tuple[str, ...]) -> None:
        self.details = details
        self.own_uris = own_uris
        self._elements: dict[str, str] = {}  # peer certificate PEM -> element; bounded below

    def element(self, peer_pem: str) -> str:
        """This hop's element for a peer certificate (computed once per certificate)."""
        cached = self._elements.get(peer_pem)
        if cached is not None:
            return cached
        peer = peer_certificate(peer_pem)
        d = self.details
        parts = [f"By={uri}" for uri in self.own_uris]
        parts.append(f"Hash={peer.sha256}")
        if d.cert:
            parts.append(f'Cert="{url_encoded_pem(peer_pem)}"')
        if d.subject:
            parts.append(f'Subject="{peer.subject}"')
        if d.uri:
            parts.extend([f"URI={uri}" for uri in peer.uris] or ["URI="])
        if d.dns:
            parts.extend(f"DNS={name}" for name in peer.dns)
        value = ";".join(parts)
        if len(self._elements) >= 1024:  # peers of one sidecar are few; keep memory bounded anyway
            self._elements.clear()
        self._elements[peer_pem] = value
        return value

    def apply(self, headers: list[tuple[str, str]], peer_pem: str) -> list[tuple[str, str]]:
        mode = self.details.forward
        if mode == "ALWAYS_FORWARD_ONLY":
            return headers
        if mode == "SANITIZE" or not peer_pem:
            if any(k == XFCC_HEADER for k, _ in headers):
                return [(k, v) for k, v in headers if k != XFCC_HEADER]
            return headers
        if mode == "FORWARD_ONLY":
            return headers
        element = self.element(peer_pem)
        given = [v for k, v in headers if k == XFCC_HEADER]
        out = [(k, v) for k, v in headers if k != XFCC_HEADER] if given else list(headers)
        if mode == "APPEND_FORWARD" and given:
            element = ",".join([*given, element])
        out.append((XFCC_HEADER, element))
        return out

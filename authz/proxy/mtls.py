"""mTLS on SPIFFE SVIDs with the stdlib ``ssl`` module (spec ``proxy.md`` §3.5).

Server side verifies the client's chain against the mesh bundle (``CERT_REQUIRED``) and hands the peer's
SPIFFE ID to the authorizer. Client side (ISTIO_MUTUAL origination) verifies the chain but not the hostname:
Python's hostname check knows only DNS/IP SANs and an SVID carries a URI SAN, so we check the SPIFFE ID
ourselves after the handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from authz.proxy.settings import IdentityFiles

__all__ = ["PeerIdentity", "client_context", "peer_identity", "server_context", "spiffe_id_of"]


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """``principal`` is the peer's SPIFFE ID ("" unless exactly one URI SAN); ``certificate`` its leaf PEM."""

    principal: str = ""
    certificate: str = ""


def _load(ctx: ssl.SSLContext, files: IdentityFiles) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The leaf plus its intermediates, as write_svid lays them out: cert.pem is the leaf, chain.pem the chain.
    ctx.load_cert_chain(files.chain or files.cert, files.key)
    ctx.load_verify_locations(cafile=files.bundle)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(files: IdentityFiles) -> ssl.SSLContext:
    """Inbound: require and verify a client SVID from the mesh CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return _load(ctx, files)


def client_context(files: IdentityFiles) -> ssl.SSLContext:
    """Outbound ISTIO_MUTUAL: present our SVID, verify the server chain, no hostname check (spec §3.5)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _load(ctx, files)


def spiffe_id_of(peercert: dict[str, Any] | None) -> str:
    """The SPIFFE ID of a verified peer certificate, or "".

    SPIFFE X509-SVID §2: an SVID carries exactly one URI SAN; "Validators encountering an SVID containing
    more than one URI SAN MUST reject the SVID" -- so zero or several URI SANs give no identity.
    """
    if not peercert:
        return ""
    uris = [v for k, v in peercert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return ""
    return str(uris[0])


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerIdentity:
    """Identity of the verified peer of a TLS connection (``transport.get_extra_info("ssl_object")``)."""
    if ssl_object is None:
        return PeerIdentity()
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return PeerIdentity()
    return PeerIdentity(spiffe_id_of(ssl_object.getpeercert()), ssl.DER_cert_to_PEM_cert(der))

"""Workload identity: SPIFFE IDs, a dev CA minting X.509-SVIDs, peer identity and certificate-bound tokens.

Modules: :mod:`~authz.identity.spiffe` (IDs), :mod:`~authz.identity.ca` (dev CA),
:mod:`~authz.identity.certs` (peer certificates, XFCC), :mod:`~authz.identity.peer` (who is the peer),
:mod:`~authz.identity.binding` (RFC 8705 and SPIFFE-bound tokens), :mod:`~authz.identity.cli`
(``authz ca``). Imports only shared values (``authz.errors``, ``authz.request``).
"""

from __future__ import annotations

from authz.identity.binding import (
    BindingMode,
    BindingPattern,
    check_certificate_binding,
    check_spiffe_binding,
    compile_binding_pattern,
)
from authz.identity.ca import (
    CertificateAuthority,
    Svid,
    create_ca,
    issue_svid,
    load_ca,
    write_ca,
    write_svid,
)
from authz.identity.certs import (
    XFCC_HEADER,
    InvalidPeerCertificate,
    InvalidXfcc,
    PeerCertificate,
    XfccElement,
    certificate_thumbprint,
    check_certificate_validity,
    decode_peer_certificate,
    load_peer_certificate,
    load_trust_bundle,
    parse_xfcc,
    spiffe_id_of,
    verify_certificate_chain,
)
from authz.identity.peer import PeerIdentity, PeerSource, PeerTrust, RejectedSource, resolve_peer_identity
from authz.identity.spiffe import InvalidSpiffeId, SpiffeId, validate_path, validate_trust_domain

__all__ = [
    "XFCC_HEADER",
    "BindingMode",
    "BindingPattern",
    "CertificateAuthority",
    "InvalidPeerCertificate",
    "InvalidSpiffeId",
    "InvalidXfcc",
    "PeerCertificate",
    "PeerIdentity",
    "PeerSource",
    "PeerTrust",
    "RejectedSource",
    "SpiffeId",
    "Svid",
    "XfccElement",
    "certificate_thumbprint",
    "check_certificate_binding",
    "check_certificate_validity",
    "check_spiffe_binding",
    "compile_binding_pattern",
    "create_ca",
    "decode_peer_certificate",
    "issue_svid",
    "load_ca",
    "load_peer_certificate",
    "load_trust_bundle",
    "parse_xfcc",
    "resolve_peer_identity",
    "spiffe_id_of",
    "validate_path",
    "validate_trust_domain",
    "verify_certificate_chain",
    "write_ca",
    "write_svid",
]

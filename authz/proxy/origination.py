"""TLS origination to an upstream (DestinationRule ``tls.mode`` SIMPLE or MUTUAL) with the stdlib ``ssl``.

istiod builds an ``UpstreamTlsContext`` from ``ClientTLSSettings`` (IST ``pilot/pkg/networking/core/
cluster_tls.go``): the server chain is checked against ``caCertificates`` (the system store when unset) unless
``insecureSkipVerify``; MUTUAL presents ``clientCertificate`` / ``privateKey``; ``subjectAltNames`` become
exact SAN matchers (DNS, URI, IP). With neither ``sni`` nor ``subjectAltNames`` (and verification on) istiod
turns on Envoy's ``auto_sni`` + ``auto_san_validation`` (``setAutoSniAndAutoSanValidation``): the SNI is the
destination host and the certificate must be valid for it (a hostname check). With ``sni`` set and no SANs
only the chain is checked.

A certificate that fails any check fails the connection: the pool reports a connect failure (503, flag UF).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from authz.proxy.model import TLSSettings, TrafficPolicy

__all__ = ["ORIGINATING_MODES", "Origination", "origination_context", "policy_tls_settings", "san_matches"]

ORIGINATING_MODES = frozenset({"SIMPLE", "MUTUAL"})


def origination_context(tls: TLSSettings) -> ssl.SSLContext:
    """The client context of one ``ClientTLSSettings``; reads the PEM files (OSError, ssl.SSLError if bad)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # Envoy's upstream default minimum
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        if tls.ca_certificates:
            ctx.load_verify_locations(cafile=tls.ca_certificates)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        # IST setAutoSniAndAutoSanValidation: auto SAN validation only without sni and without SANs.
        ctx.check_hostname = not tls.sni and not tls.subject_alt_names
        ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.mode == "MUTUAL":
        ctx.load_cert_chain(tls.client_certificate, tls.private_key)
    return ctx


def _dns_match(pattern: str, name: str) -> bool:
    """Envoy ``Utility::dnsNameMatch``: exact (case-insensitive), or a certificate ``*.suffix`` covering one
    leftmost label of ``name``."""
    pattern, name = pattern.lower(), name.lower()
    if pattern == name:
        return True
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return False


def san_matches(peercert: dict[str, Any] | None, wanted: Iterable[str]) -> bool:
    """True when a SAN of the verified certificate equals one of ``wanted`` (Envoy exact SAN matchers)."""
    if not peercert:
        return False
    sans = peercert.get("subjectAltName", ())
    for want in wanted:
        for kind, value in sans:
            if kind == "DNS" and _dns_match(value, want):
                return True
            if kind == "URI" and value == want:
                return True
            if kind == "IP Address" and _same_ip(value, want):
                return True
    return False


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.strip()) == ipaddress.ip_address(b.strip())
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Origination:
    """How a cluster's pools open TLS: the context, the SNI, and the SANs to check after the handshake."""

    context: ssl.SSLContext
    server_hostname: str
    subject_alt_names: tuple[str, ...] = ()

    def problem(self, peercert: dict[str, Any] | None) -> str:
        """ "" when the handshake's certificate is acceptable, else why not (the chain and, with auto SAN
        validation, the hostname were already checked by ``ssl`` during the handshake)."""
        if self.subject_alt_names and not san_matches(peercert, self.subject_alt_names):
            return f"upstream certificate matches none of the subjectAltNames {list(self.subject_alt_names)}"
        return ""


def policy_tls_settings(policies: Iterable[TrafficPolicy]) -> list[TLSSettings]:
    """Every SIMPLE/MUTUAL ``tls`` of ``policies`` and their port-level entries (contexts are built early)."""
    out: list[TLSSettings] = []
    for policy in policies:
        for p in (policy, *(entry for _, entry in policy.port_level)):
            if p.tls is not None and p.tls.mode in ORIGINATING_MODES and p.tls not in out:
                out.append(p.tls)
    return out

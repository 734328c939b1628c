"""A small development CA that mints X.509-SVIDs for the local mesh, the demo and the tests.

Certificates follow the X.509-SVID specification (``spiffe/spiffe`` ``standards/X509-SVID.md``):

* the signing (root) certificate has ``basicConstraints CA:true`` and ``keyUsage keyCertSign, cRLSign``
  (X.509-SVID §4.1, §4.3) and carries the trust domain ID ``spiffe://<td>`` as its URI SAN (§2);
* a leaf SVID has exactly one URI SAN, the workload's SPIFFE ID (§2), ``CA:false`` (§4.1),
  ``keyUsage digitalSignature`` and no ``keyCertSign``/``cRLSign`` (§4.3), and
  ``extKeyUsage serverAuth, clientAuth`` (§4.4) so that the same SVID serves both ends of mutual TLS.

Keys are EC P-256 (ECDSA with SHA-256). No key encipherment bit: ECDHE key exchange never encrypts with
the certificate key (RFC 5480 §3). Both certificates carry a subject key identifier and, so that
OpenSSL's ``X509_STRICT`` checks (Python 3.13's default) and BoringSSL accept the chain, an authority
key identifier (RFC 5280 §4.2.1.1, §4.2.1.2).

The pure functions take ``now``; only :func:`write_ca`, :func:`load_ca` and :func:`write_svid` touch
the file system. Private keys are written with mode 0600 from the moment the file exists.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authz.errors import ConfigError
from authz.identity.spiffe import InvalidSpiffeId, SpiffeId, validate_trust_domain

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CLOCK_SKEW_BACKDATE",
    "DEFAULT_CA_VALIDITY",
    "DEFAULT_SVID_VALIDITY",
    "SVID_BUNDLE_FILE",
    "SVID_CERT_FILE",
    "SVID_CHAIN_FILE",
    "SVID_KEY_FILE",
    "CertificateAuthority",
    "Svid",
    "create_ca",
    "issue_svid",
    "load_ca",
    "write_ca",
    "write_svid",
]

DEFAULT_CA_VALIDITY = timedelta(days=365)  # a dev root: long enough for a project's life, not forever
DEFAULT_SVID_VALIDITY = timedelta(hours=24)  # short-lived like Istio's workload certs (24 h default)
CLOCK_SKEW_BACKDATE = timedelta(seconds=10)  # notBefore slightly in the past, as SPIRE does, for skew

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
SVID_CERT_FILE = "cert.pem"
SVID_KEY_FILE = "key.pem"
SVID_CHAIN_FILE = "chain.pem"
SVID_BUNDLE_FILE = "bundle.pem"

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_MAX_CN_CHARS = 64  # RFC 5280 Appendix A: ub-common-name


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed root for one trust domain: its certificate and PKCS#8 private key, as PEM."""

    trust_domain: str
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Svid:
    """An X.509-SVID: the leaf, its key, the chain to present and the bundle (roots) to trust."""

    spiffe_id: str
    cert_pem: bytes
    key_pem: bytes
    chain_pem: bytes
    bundle_pem: bytes


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


def _check_validity(validity: timedelta) -> None:
    if validity <= timedelta(0):
        raise ConfigError(
            f"validity must be positive, got {validity}", field="validity", reason="invalid_validity"
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(
    trust_domain: str, *, now: datetime | None = None, validity: timedelta = DEFAULT_CA_VALIDITY
) -> CertificateAuthority:
    """Mint a self-signed root CA for ``trust_domain`` (X.509-SVID §4.1/§4.3 signing certificate)."""
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as exc:
        raise ConfigError(exc.message, field="trust_domain", reason=exc.reason) from exc
    _check_validity(validity)
    start = _utc(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshauthz"),
            x509.NameAttribute(NameOID.COMMON_NAME, "meshauthz dev CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW_BACKDATE)
        .not_valid_after(start + validity)
        # X.509-SVID §4.1: signing certificates set CA:true. pathLen 0: this CA never mints intermediates.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # X.509-SVID §4.3: keyCertSign MUST, cRLSign MAY; critical per RFC 5280 §4.2.1.3.
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # X.509-SVID §2: a signing certificate MAY carry the trust domain ID as its URI SAN.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(SpiffeId(trust_domain)))]),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(trust_domain=trust_domain, cert_pem=_cert_pem(cert), key_pem=_key_pem(key))


def _parse_spiffe_id(spiffe_id: str) -> SpiffeId:
    try:
        return SpiffeId.parse(spiffe_id)
    except InvalidSpiffeId as exc:
        raise ConfigError(exc.message, field="spiffe_id", reason=exc.reason) from exc


def _check_dns_name(dns_name: str) -> str:
    label_chars = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-*")
    labels = dns_name.split(".")
    if not dns_name or len(dns_name) > 253 or any(not lab or set(lab) - label_chars for lab in labels):
        raise ConfigError(f"not a DNS name: {dns_name!r}", field="dns_names", reason="invalid_dns_name")
    return dns_name


def _load_ca_objects(ca: CertificateAuthority) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert_pem)
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the CA certificate or key is not valid PEM: {exc}", reason="invalid_ca") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the CA key is not an EC key", reason="invalid_ca")
    return cert, key


def issue_svid(
    ca: CertificateAuthority,
    spiffe_id: str,
    *,
    now: datetime | None = None,
    validity: timedelta = DEFAULT_SVID_VALIDITY,
    dns_names: Sequence[str] = (),
) -> Svid:
    """Mint a leaf X.509-SVID for ``spiffe_id`` signed by ``ca``.

    Refuses (``ConfigError``) a malformed ID, an ID of another trust domain than the CA's
    (``spiffe_id_trust_domain_mismatch``: X.509-SVID §5.2, a CA only vouches for its own trust domain)
    and the bare trust domain ID (``spiffe_id_without_path``: it names no workload). The leaf's
    ``notAfter`` never exceeds the CA's (a certificate cannot outlive its issuer).
    """
    sid = _parse_spiffe_id(spiffe_id)
    if sid.trust_domain != ca.trust_domain:
        raise ConfigError(
            f"{sid} is not in the CA's trust domain {ca.trust_domain!r}",
            field="spiffe_id",
            reason="spiffe_id_trust_domain_mismatch",
        )
    if not sid.path:
        raise ConfigError(
            f"{sid} is a trust domain ID; a workload SVID needs a path",
            field="spiffe_id",
            reason="spiffe_id_without_path",
        )
    _check_validity(validity)
    names = [_check_dns_name(d) for d in dns_names]
    ca_cert, ca_key = _load_ca_objects(ca)
    start = _utc(now)
    not_after = min(start + validity, ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = (names[0] if names else sid.segments[-1])[:_MAX_CN_CHARS]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshauthz"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(sid))]
    sans.extend(x509.DNSName(d) for d in names)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW_BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)  # X.509-SVID §4.1
        .add_extension(
            x509.KeyUsage(  # X.509-SVID §4.3: digitalSignature MUST; keyCertSign, cRLSign MUST NOT
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(  # X.509-SVID §4.4: serverAuth and clientAuth, one SVID for both TLS ends
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)  # X.509-SVID §2: one URI SAN
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_pem = _cert_pem(cert)
    return Svid(
        spiffe_id=str(sid),
        cert_pem=leaf_pem,
        key_pem=_key_pem(key),
        # Envoy's ``certificate_chain`` and Python's ``load_cert_chain``: the leaf first, then any
        # intermediates, root excluded (RFC 8446 §4.4.2 lets the root be omitted). This CA signs leaves
        # directly, so the chain is the leaf alone.
        chain_pem=leaf_pem,
        bundle_pem=ca.cert_pem,
    )


def _write_file(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` atomically: a fresh temporary file created with ``mode``, then renamed over ``path``.

    Creating the file with its final mode (``O_CREAT | O_EXCL``) means a private key is never readable
    by others, not even for an instant, and an existing file with looser permissions is replaced, not
    reused.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, mode)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(
            f"cannot write: {exc.strerror or exc}", file=str(path), reason="cannot_write"
        ) from exc
    return path


def _ensure_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create directory: {exc.strerror or exc}", file=str(out_dir), reason="cannot_write"
        ) from exc


def write_ca(ca: CertificateAuthority, out_dir: Path) -> dict[str, Path]:
    """Write ``ca-cert.pem`` (0644) and ``ca-key.pem`` (0600) into ``out_dir``; return ``{"cert", "key"}``."""
    out_dir = Path(out_dir)
    _ensure_dir(out_dir)
    return {
        "key": _write_file(out_dir / CA_KEY_FILE, ca.key_pem, _PRIVATE_MODE),
        "cert": _write_file(out_dir / CA_CERT_FILE, ca.cert_pem, _PUBLIC_MODE),
    }


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            "file not found (run `authz ca init` first)", file=str(path), reason="ca_not_found"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"cannot read: {exc.strerror or exc}", file=str(path), reason="ca_not_found"
        ) from exc


def load_ca(dir: Path) -> CertificateAuthority:
    """Read a CA written by :func:`write_ca`; check that the key matches and the cert is a SPIFFE CA."""
    directory = Path(dir)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    cert_pem, key_pem = _read(cert_path), _read(key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}", file=str(cert_path), reason="invalid_ca") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"not an unencrypted PEM private key: {exc}", file=str(key_path), reason="invalid_ca"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(
            "the key does not belong to the CA certificate", file=str(key_path), reason="invalid_ca"
        )
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as exc:
        raise ConfigError(
            f"not a SPIFFE CA certificate: {exc}", file=str(cert_path), reason="invalid_ca"
        ) from exc
    if not constraints.ca:
        raise ConfigError("the certificate is not a CA (CA:false)", file=str(cert_path), reason="invalid_ca")
    if len(uris) != 1:
        raise ConfigError(
            "a SPIFFE CA carries exactly one URI SAN, the trust domain ID",
            file=str(cert_path),
            reason="invalid_ca",
        )
    try:
        td_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise ConfigError(
            exc.message, file=str(cert_path), field="subjectAltName", reason=exc.reason
        ) from exc
    if td_id.path:
        raise ConfigError(
            f"the CA URI SAN {td_id} is not a trust domain ID", file=str(cert_path), reason="invalid_ca"
        )
    return CertificateAuthority(trust_domain=td_id.trust_domain, cert_pem=cert_pem, key_pem=key_pem)


def write_svid(svid: Svid, out_dir: Path) -> dict[str, Path]:
    """Write ``cert.pem``, ``key.pem`` (0600), ``chain.pem`` and ``bundle.pem`` into ``out_dir``.

    Returns ``{"cert", "key", "chain", "bundle"}`` mapped to the paths written.
    """
    out_dir = Path(out_dir)
    _ensure_dir(out_dir)
    return {
        "key": _write_file(out_dir / SVID_KEY_FILE, svid.key_pem, _PRIVATE_MODE),
        "cert": _write_file(out_dir / SVID_CERT_FILE, svid.cert_pem, _PUBLIC_MODE),
        "chain": _write_file(out_dir / SVID_CHAIN_FILE, svid.chain_pem, _PUBLIC_MODE),
        "bundle": _write_file(out_dir / SVID_BUNDLE_FILE, svid.bundle_pem, _PUBLIC_MODE),
    }

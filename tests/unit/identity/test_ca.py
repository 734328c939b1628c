"""The dev CA: certificate profile (X.509-SVID), refusals, files on disk, and a real mutual-TLS handshake."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from authz.errors import ConfigError
from authz.identity.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CLOCK_SKEW_BACKDATE,
    CertificateAuthority,
    Svid,
    create_ca,
    issue_svid,
    load_ca,
    write_ca,
    write_svid,
)

from .conftest import ALICE, BOB, NOW, TD


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def test_root_profile(ca: CertificateAuthority) -> None:
    root = _cert(ca.cert_pem)
    assert ca.trust_domain == TD
    bc = _ext(root, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True  # type: ignore[attr-defined]
    ku = _ext(root, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign  # type: ignore[attr-defined]
    assert not ku.value.digital_signature  # type: ignore[attr-defined]
    san = _ext(root, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]  # type: ignore[attr-defined]
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    _ext(root, x509.SubjectKeyIdentifier)
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert key.public_key() == root.public_key()


def test_root_validity_uses_injected_clock() -> None:
    made = create_ca("td", now=NOW, validity=timedelta(days=2))
    root = _cert(made.cert_pem)
    assert root.not_valid_before_utc == NOW - CLOCK_SKEW_BACKDATE
    assert root.not_valid_after_utc == NOW + timedelta(days=2)


def test_leaf_profile(ca: CertificateAuthority) -> None:
    svid = issue_svid(ca, ALICE, now=NOW, validity=timedelta(hours=2), dns_names=["alice.shop.svc"])
    leaf = _cert(svid.cert_pem)
    root = _cert(ca.cert_pem)
    leaf.verify_directly_issued_by(root)
    assert svid.spiffe_id == ALICE
    assert svid.chain_pem == svid.cert_pem
    assert svid.bundle_pem == ca.cert_pem
    bc = _ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False  # type: ignore[attr-defined]
    ku = _ext(leaf, x509.KeyUsage).value
    assert ku.digital_signature  # type: ignore[attr-defined]
    assert not ku.key_cert_sign and not ku.crl_sign and not ku.key_encipherment  # type: ignore[attr-defined]
    eku = _ext(leaf, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # type: ignore[call-overload]
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ALICE]  # type: ignore[attr-defined]
    assert san.get_values_for_type(x509.DNSName) == ["alice.shop.svc"]  # type: ignore[attr-defined]
    aki = _ext(leaf, x509.AuthorityKeyIdentifier).value
    ski = _ext(root, x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest  # type: ignore[attr-defined]
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW_BACKDATE
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=2)
    key = serialization.load_pem_private_key(svid.key_pem, password=None)
    assert key.public_key() == leaf.public_key()


def test_leaf_never_outlives_the_ca() -> None:
    short = create_ca("td", now=NOW, validity=timedelta(hours=1))
    svid = issue_svid(short, "spiffe://td/w", now=NOW, validity=timedelta(days=30))
    assert _cert(svid.cert_pem).not_valid_after_utc == NOW + timedelta(hours=1)


def test_each_svid_has_its_own_key(ca: CertificateAuthority) -> None:
    a = issue_svid(ca, ALICE, now=NOW)
    b = issue_svid(ca, ALICE, now=NOW)
    assert a.key_pem != b.key_pem
    assert _cert(a.cert_pem).serial_number != _cert(b.cert_pem).serial_number


def test_naive_datetime_is_utc(ca: CertificateAuthority) -> None:
    svid = issue_svid(ca, ALICE, now=NOW.replace(tzinfo=None))
    assert _cert(svid.cert_pem).not_valid_before_utc == NOW - CLOCK_SKEW_BACKDATE
    assert NOW.tzinfo is UTC


@pytest.mark.parametrize(
    ("spiffe_id", "reason"),
    [
        ("not a uri", "spiffe_id_wrong_scheme"),
        ("spiffe://example.org/ns/../sa/x", "spiffe_id_dot_segment"),
        ("spiffe://example.org/ns/a/", "spiffe_id_trailing_slash"),
        ("spiffe://other.org/ns/a/sa/b", "spiffe_id_trust_domain_mismatch"),
        ("spiffe://example.org", "spiffe_id_without_path"),
    ],
)
def test_issue_refuses(ca: CertificateAuthority, spiffe_id: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        issue_svid(ca, spiffe_id, now=NOW)
    assert info.value.reason == reason
    assert info.value.field == "spiffe_id"


def test_issue_refuses_bad_dns_and_validity(ca: CertificateAuthority) -> None:
    with pytest.raises(ConfigError) as info:
        issue_svid(ca, ALICE, now=NOW, dns_names=["bad name"])
    assert info.value.reason == "invalid_dns_name"
    with pytest.raises(ConfigError) as info:
        issue_svid(ca, ALICE, now=NOW, validity=timedelta(0))
    assert info.value.reason == "invalid_validity"


@pytest.mark.parametrize(
    ("td", "reason"), [("Bad.TD", "spiffe_id_bad_trust_domain_char"), ("", "spiffe_id_missing_trust_domain")]
)
def test_create_refuses_bad_trust_domain(td: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_ca(td)
    assert info.value.reason == reason
    assert info.value.field == "trust_domain"


def test_issue_with_corrupt_ca_is_a_config_error(ca: CertificateAuthority) -> None:
    broken = CertificateAuthority(trust_domain=TD, cert_pem=ca.cert_pem, key_pem=b"garbage")
    with pytest.raises(ConfigError) as info:
        issue_svid(broken, ALICE, now=NOW)
    assert info.value.reason == "invalid_ca"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_and_load_ca(tmp_path: Path, ca: CertificateAuthority) -> None:
    files = write_ca(ca, tmp_path / "ca")
    assert set(files) == {"cert", "key"}
    assert files["key"].name == CA_KEY_FILE and files["cert"].name == CA_CERT_FILE
    assert _mode(files["key"]) == 0o600
    assert files["cert"].read_bytes() == ca.cert_pem
    assert load_ca(tmp_path / "ca") == ca
    assert [p.name for p in (tmp_path / "ca").iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_rewrite_replaces_a_world_readable_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    (tmp_path / CA_KEY_FILE).write_bytes(b"old")
    (tmp_path / CA_KEY_FILE).chmod(0o644)
    files = write_ca(ca, tmp_path)
    assert _mode(files["key"]) == 0o600
    assert files["key"].read_bytes() == ca.key_pem


def test_write_svid(tmp_path: Path, alice: Svid) -> None:
    files = write_svid(alice, tmp_path / "alice")
    assert {k: p.name for k, p in files.items()} == {
        "cert": "cert.pem",
        "key": "key.pem",
        "chain": "chain.pem",
        "bundle": "bundle.pem",
    }
    assert _mode(files["key"]) == 0o600
    assert files["key"].read_bytes() == alice.key_pem
    assert files["bundle"].read_bytes() == alice.bundle_pem


def test_write_into_a_file_path_is_a_config_error(tmp_path: Path, alice: Svid) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as info:
        write_svid(alice, blocker)
    assert info.value.reason == "cannot_write"


def test_load_ca_errors(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority, alice: Svid
) -> None:
    with pytest.raises(ConfigError) as info:
        load_ca(tmp_path)
    assert info.value.reason == "ca_not_found"
    assert info.value.file.endswith(CA_CERT_FILE)

    mixed = CertificateAuthority(trust_domain=TD, cert_pem=ca.cert_pem, key_pem=other_ca.key_pem)
    write_ca(mixed, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_ca(tmp_path)
    assert info.value.reason == "invalid_ca"
    assert "does not belong" in info.value.message

    leaf_as_ca = CertificateAuthority(trust_domain=TD, cert_pem=alice.cert_pem, key_pem=alice.key_pem)
    write_ca(leaf_as_ca, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_ca(tmp_path)
    assert info.value.reason == "invalid_ca"
    assert "not a CA" in info.value.message

    (tmp_path / CA_CERT_FILE).write_bytes(b"not pem")
    with pytest.raises(ConfigError) as info:
        load_ca(tmp_path)
    assert info.value.reason == "invalid_ca"


# -------------------------------------------------------------------------------------------------------
# Real mutual TLS with Python's ssl module, certificates minted for the real clock.


def _context(side: ssl._SSLMethod, files: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files["chain"], files["key"])
    ctx.load_verify_locations(files["bundle"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; our chain must pass it
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # SPIFFE authenticates the URI SAN, checked below, not a host name
    return ctx


def _uri_sans(peer: Any) -> list[str]:
    assert peer is not None
    sans = peer.get("subjectAltName", ())
    assert isinstance(sans, tuple)
    return [value for kind, value in sans if kind == "URI"]


def _handshake(
    server_files: dict[str, Path], client_files: dict[str, Path]
) -> tuple[list[str], list[str], list[BaseException]]:
    """One mTLS exchange on 127.0.0.1:0: (URI SANs the server saw, URI SANs the client saw, errors)."""
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, server_files)
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, client_files)
    seen_by_server: list[str] = []
    seen_by_client: list[str] = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen_by_server.extend(_uri_sans(tls.getpeercert()))
                    tls.sendall(tls.recv(16).upper())
            except (OSError, ssl.SSLError) as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw) as tls,
            ):
                seen_by_client.extend(_uri_sans(tls.getpeercert()))
                tls.sendall(b"ping")
                if tls.recv(16) != b"PING":
                    errors.append(ConnectionError("no echo"))
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)
        finally:
            thread.join(timeout=10)
    assert not thread.is_alive()
    return seen_by_server, seen_by_client, errors


@pytest.fixture(scope="module")
def live_ca() -> CertificateAuthority:
    return create_ca(TD)


def test_mutual_tls_with_two_svids(tmp_path: Path, live_ca: CertificateAuthority) -> None:
    server = write_svid(issue_svid(live_ca, BOB), tmp_path / "server")
    client = write_svid(issue_svid(live_ca, ALICE), tmp_path / "client")
    seen_by_server, seen_by_client, errors = _handshake(server, client)
    assert errors == []
    assert seen_by_server == [ALICE]
    assert seen_by_client == [BOB]


def test_mutual_tls_refuses_a_client_from_another_root(tmp_path: Path, live_ca: CertificateAuthority) -> None:
    stranger_ca = create_ca(TD)
    server = write_svid(issue_svid(live_ca, BOB), tmp_path / "server")
    stranger = write_svid(issue_svid(stranger_ca, ALICE), tmp_path / "stranger")
    client = dict(stranger, bundle=server["bundle"])  # the stranger trusts our root, we do not trust theirs
    seen_by_server, _, errors = _handshake(server, client)
    assert seen_by_server == []
    assert any(isinstance(e, ssl.SSLError) and "certificate" in str(e).lower() for e in errors), errors

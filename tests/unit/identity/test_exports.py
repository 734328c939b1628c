"""The public surface of authz.identity is exactly what is intended, and the package imports no siblings."""

from __future__ import annotations

import ast
from pathlib import Path

from authz import identity

PACKAGE = Path(identity.__file__).parent


def test_exported_names() -> None:
    assert set(identity.__all__) == {
        "XFCC_HEADER", "BindingMode", "BindingPattern", "CertificateAuthority", "InvalidPeerCertificate",
        "InvalidSpiffeId", "InvalidXfcc", "PeerCertificate", "PeerIdentity", "PeerSource", "PeerTrust",
        "RejectedSource", "SpiffeId", "Svid", "XfccElement", "certificate_thumbprint",
        "check_certificate_binding", "check_certificate_validity", "check_spiffe_binding",
        "compile_binding_pattern", "create_ca", "decode_peer_certificate", "issue_svid", "load_ca",
        "load_peer_certificate", "load_trust_bundle", "parse_xfcc", "resolve_peer_identity", "spiffe_id_of",
        "validate_path", "validate_trust_domain", "verify_certificate_chain", "write_ca", "write_svid",
    }  # fmt: skip
    for name in identity.__all__:
        assert hasattr(identity, name), name


def test_imports_only_shared_values() -> None:
    allowed = {"authz.errors", "authz.request", "authz.clock"}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("authz"):
                assert node.module in allowed or node.module.startswith("authz.identity"), (
                    path.name,
                    node.module,
                )

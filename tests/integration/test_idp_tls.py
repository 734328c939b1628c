"""The mock IdP over HTTPS: RFC 8705 certificate-bound tokens from the real TLS peer certificate."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from authz.idp import TlsFiles, parse_config, running_idp

pytestmark = pytest.mark.integration

CONFIG = """\
apiVersion: meshauthz.dev/v1alpha1
kind: MockIdentityProvider
metadata: {name: tls}
spec:
  issuers:
    - name: main
      clients:
        - {clientId: svc, clientSecret: svc-secret}
        - {clientId: mtls, authMethod: tls_client_auth}
"""


@dataclass(frozen=True)
class Pki:
    ca_pem: str
    server_cert_pem: str
    server_key_pem: str
    client_cert_pem: str
    client_key_pem: str
    client_thumbprint: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def make_pki() -> Pki:
    """A throw-away CA, a server cert for 127.0.0.1 and a client cert, generated in memory."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test ca"))
        .issuer_name(_name("test ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, *, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("127.0.0.1", server=True)
    client, client_key = leaf("client", server=False)
    der = client.public_bytes(serialization.Encoding.DER)
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    pem = serialization.Encoding.PEM
    return Pki(
        ca_pem=ca.public_bytes(pem).decode(),
        server_cert_pem=server.public_bytes(pem).decode(),
        server_key_pem=_pem_key(server_key),
        client_cert_pem=client.public_bytes(pem).decode(),
        client_key_pem=_pem_key(client_key),
        client_thumbprint=thumbprint,
    )


def _write(tmp: Path, pki: Pki) -> dict[str, Path]:
    files = {
        "ca": pki.ca_pem,
        "cert": pki.server_cert_pem,
        "key": pki.server_key_pem,
        "client_cert": pki.client_cert_pem,
        "client_key": pki.client_key_pem,
    }
    out = {}
    for name, text in files.items():
        path = tmp / f"{name}.pem"
        path.write_text(text)
        out[name] = path
    return out


def test_tls_client_certificate_binds_tokens_and_authenticates(tmp_path: Path) -> None:
    pki = make_pki()
    files = _write(tmp_path, pki)
    tls = TlsFiles(cert=files["cert"], key=files["key"], client_ca=files["ca"])
    with running_idp(parse_config(CONFIG), tls=tls) as idp:
        assert idp.url.startswith("https://127.0.0.1:")
        with_cert = ssl.create_default_context(cafile=str(files["ca"]))
        with_cert.load_cert_chain(str(files["client_cert"]), str(files["client_key"]))
        without_cert = ssl.create_default_context(cafile=str(files["ca"]))
        token_url = idp.endpoint("token")
        with httpx.Client(verify=with_cert, timeout=10) as client:
            # secret authentication over a connection that also presented a certificate: bound token
            resp = client.post(
                token_url, data={"grant_type": "client_credentials"}, auth=("svc", "svc-secret")
            )
            claims = jwt.decode(resp.json()["access_token"], options={"verify_signature": False})
            assert claims["cnf"] == {"x5t#S256": pki.client_thumbprint}
            # RFC 8705 tls_client_auth: the certificate is the credential
            resp = client.post(token_url, data={"grant_type": "client_credentials", "client_id": "mtls"})
            assert resp.status_code == 200, resp.text
            jwks = client.get(idp.endpoint("jwks")).json()
            key = jwt.PyJWKSet.from_dict(jwks).keys[0]
            claims = jwt.decode(resp.json()["access_token"], key.key, algorithms=["RS256"], audience="mtls")
            assert claims["sub"] == "mtls" and claims["cnf"]["x5t#S256"] == pki.client_thumbprint
        with httpx.Client(verify=without_cert, timeout=10) as client:
            # client certificates are optional: no certificate, no binding
            resp = client.post(
                token_url, data={"grant_type": "client_credentials"}, auth=("svc", "svc-secret")
            )
            assert "cnf" not in jwt.decode(resp.json()["access_token"], options={"verify_signature": False})
            resp = client.post(token_url, data={"grant_type": "client_credentials", "client_id": "mtls"})
            assert (resp.status_code, resp.json()["error"]) == (401, "invalid_client")

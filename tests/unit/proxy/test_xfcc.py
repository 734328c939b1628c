"""``x-forwarded-client-cert`` rules (Envoy ``mutateXfccRequestHeader``) and their ProxyConfig settings."""

from __future__ import annotations

import hashlib
import ssl

import pytest

from authz.identity.ca import create_ca, issue_svid
from authz.proxy.loader import parse_resources
from authz.proxy.settings import ClientCertDetails
from authz.proxy.xfcc import XFCC_HEADER, ClientCertForwarding, certificate_uris, peer_certificate
from authz.resources import parse_documents

CA = create_ca("cluster.local")
PEER = issue_svid(CA, "spiffe://cluster.local/ns/a/sa/client", dns_names=["client.a.svc"])
OWN = issue_svid(CA, "spiffe://cluster.local/ns/b/sa/server")
PEER_PEM = PEER.cert_pem.decode()
DIGEST = hashlib.sha256(ssl.PEM_cert_to_DER_cert(PEER_PEM)).hexdigest()
OWN_URIS = certificate_uris(OWN.cert_pem)
FORGED = [("x-forwarded-client-cert", "By=spiffe://forged;URI=spiffe://admin"), ("x-a", "1")]
FULL = (
    f"By=spiffe://cluster.local/ns/b/sa/server;Hash={DIGEST};"
    'Subject="CN=client.a.svc,O=meshauthz";URI=spiffe://cluster.local/ns/a/sa/client;DNS=client.a.svc'
)


def forwarding(forward: str, **details: bool) -> ClientCertForwarding:
    return ClientCertForwarding(ClientCertDetails(forward, **details), OWN_URIS)  # type: ignore[arg-type]


def xfcc(headers: list[tuple[str, str]]) -> list[str]:
    return [v for k, v in headers if k == XFCC_HEADER]


def test_peer_certificate_fields() -> None:
    peer = peer_certificate(PEER_PEM)
    assert peer.sha256 == DIGEST
    assert peer.subject == "CN=client.a.svc,O=meshauthz"
    assert peer.uris == ("spiffe://cluster.local/ns/a/sa/client",)
    assert peer.dns == ("client.a.svc",)
    assert OWN_URIS == ("spiffe://cluster.local/ns/b/sa/server",)


@pytest.mark.parametrize(
    ("forward", "mtls", "expected"),
    [
        ("SANITIZE_SET", True, [FULL]),
        ("SANITIZE_SET", False, []),
        ("APPEND_FORWARD", True, [f"By=spiffe://forged;URI=spiffe://admin,{FULL}"]),
        ("APPEND_FORWARD", False, []),
        ("SANITIZE", True, []),
        ("FORWARD_ONLY", True, ["By=spiffe://forged;URI=spiffe://admin"]),
        ("FORWARD_ONLY", False, []),
        ("ALWAYS_FORWARD_ONLY", False, ["By=spiffe://forged;URI=spiffe://admin"]),
    ],
)
def test_modes(forward: str, mtls: bool, expected: list[str]) -> None:
    out = forwarding(forward).apply(list(FORGED), PEER_PEM if mtls else "")
    assert xfcc(out) == expected
    assert ("x-a", "1") in out


def test_details_select_the_keys_in_envoys_order() -> None:
    by_hash = f"By=spiffe://cluster.local/ns/b/sa/server;Hash={DIGEST}"
    assert forwarding("SANITIZE_SET", subject=False, uri=True, dns=False).element(PEER_PEM) == (
        by_hash + ";URI=spiffe://cluster.local/ns/a/sa/client"
    )
    assert forwarding("SANITIZE_SET", subject=False, uri=False, dns=False).element(PEER_PEM) == by_hash
    assert forwarding("SANITIZE_SET", subject=True, uri=False, dns=True).element(PEER_PEM) == (
        by_hash + ';Subject="CN=client.a.svc,O=meshauthz";DNS=client.a.svc'
    )


def test_set_without_a_client_header_adds_one_and_plaintext_without_one_is_untouched() -> None:
    headers = [("x-a", "1")]
    assert xfcc(forwarding("SANITIZE_SET").apply(headers, PEER_PEM)) == [FULL]
    assert forwarding("SANITIZE_SET").apply(headers, "") is headers  # nothing to strip: no copy


def _config(inbound: str) -> ClientCertDetails:
    text = f"""
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: p, namespace: default}}
spec:
  inbound: {inbound}
"""
    return parse_resources(parse_documents(text, "p.yaml")).settings.client_cert


def test_proxy_config_defaults_and_overrides() -> None:
    assert _config("{port: 0}") == ClientCertDetails("SANITIZE_SET", subject=True, uri=True, dns=True)
    assert _config(
        "{port: 0, forwardClientCertDetails: APPEND_FORWARD, setCurrentClientCertDetails: {uri: true}}"
    ) == (ClientCertDetails("APPEND_FORWARD", subject=False, uri=True, dns=False))
    assert _config("{port: 0, setCurrentClientCertDetails: {cert: true}}") == ClientCertDetails(
        "SANITIZE_SET", subject=False, uri=False, dns=False, cert=True
    )


@pytest.mark.parametrize(
    ("inbound", "field"),
    [
        ("{forwardClientCertDetails: SET}", "spec.inbound.forwardClientCertDetails"),
        ("{setCurrentClientCertDetails: {chain: true}}", "spec.inbound.setCurrentClientCertDetails.chain"),
        ("{setCurrentClientCertDetails: {x: true}}", "spec.inbound.setCurrentClientCertDetails.x"),
        ("{setCurrentClientCertDetails: {cert: yes-ish}}", "spec.inbound.setCurrentClientCertDetails.cert"),
    ],
)
def test_proxy_config_errors_name_the_field(inbound: str, field: str) -> None:
    with pytest.raises(Exception) as err:
        _config(inbound)
    assert field in str(err.value)

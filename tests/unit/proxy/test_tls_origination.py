"""DestinationRule ``tls`` SIMPLE / MUTUAL: parsing and istiod's validation (errors name file:line:field),
port-level precedence as istiod merges it, the client contexts, and the SAN matcher."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import ConfigErrors
from authz.proxy.loader import parse_resources
from authz.proxy.model import LoadBalancerSettings, TLSSettings, TrafficPolicy, merge_subset_policy
from authz.proxy.origination import Origination, origination_context, policy_tls_settings, san_matches
from authz.proxy.settings import SidecarConfig
from authz.resources import parse_documents
from tests.unit.proxy.pki import Pki, make_pki

DR = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ext, namespace: shop}
spec:
  host: api.example.com
  trafficPolicy:
    tls:
"""  # the tls fields start on line 8


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def load(text: str, base: Path | None = None) -> SidecarConfig:
    return parse_resources(parse_documents(text, "dr.yaml"), base=base)


def tls_of(cfg: SidecarConfig) -> TLSSettings:
    tls = cfg.mesh.destination_rules[0].traffic_policy.tls
    assert tls is not None
    return tls


def test_simple_with_ca_sni_and_sans(pki: Pki) -> None:
    tls = tls_of(
        load(
            DR + f"      mode: SIMPLE\n      caCertificates: {pki.ca}\n      sni: api.example.com\n"
            "      subjectAltNames: [api.example.com, spiffe://x/y]\n"
        )
    )
    assert tls == TLSSettings(
        "SIMPLE",
        ("api.example.com", "spiffe://x/y"),
        ca_certificates=str(pki.ca),
        sni="api.example.com",
    )


def test_mutual_files_are_resolved_against_the_configuration_folder(pki: Pki) -> None:
    tls = tls_of(
        load(
            DR + "      mode: MUTUAL\n      caCertificates: ca.pem\n"
            "      clientCertificate: client.pem\n      privateKey: client-key.pem\n",
            base=pki.ca.parent,
        )
    )
    assert (tls.mode, tls.ca_certificates, tls.client_certificate, tls.private_key) == (
        "MUTUAL",
        str(pki.ca),
        str(pki.client_cert),
        str(pki.client_key),
    )


def test_insecure_skip_verify_without_ca() -> None:
    tls = tls_of(load(DR + "      mode: SIMPLE\n      insecureSkipVerify: true\n"))
    assert (tls.mode, tls.insecure_skip_verify, tls.ca_certificates) == ("SIMPLE", True, "")


@pytest.mark.parametrize(
    ("fields", "line", "field", "words"),
    [
        ("      mode: PLAINTEXT\n", 8, "spec.trafficPolicy.tls.mode", "not supported"),
        (
            "      mode: SIMPLE\n      credentialName: api-secret\n",
            9,
            "spec.trafficPolicy.tls.credentialName",
            "credentialName",
        ),
        ("      mode: SIMPLE\n      caCrl: /crl.pem\n", 9, "spec.trafficPolicy.tls.caCrl", "revocation"),
        (
            "      mode: MUTUAL\n      privateKey: {key}\n",
            8,
            "spec.trafficPolicy.tls.clientCertificate",
            "client certificate required for mutual tls",
        ),
        (
            "      mode: MUTUAL\n      clientCertificate: {cert}\n",
            8,
            "spec.trafficPolicy.tls.privateKey",
            "private key required for mutual tls",
        ),
        (  # IST validateTLS: skipping verification and naming what to verify contradict
            "      mode: SIMPLE\n      caCertificates: {ca}\n      insecureSkipVerify: true\n",
            10,
            "spec.trafficPolicy.tls.insecureSkipVerify",
            "cannot specify caCertificates or subjectAltNames",
        ),
        (
            "      mode: MUTUAL\n      clientCertificate: {cert}\n      privateKey: {key}\n"
            "      subjectAltNames: [a]\n      insecureSkipVerify: true\n",
            12,
            "spec.trafficPolicy.tls.insecureSkipVerify",
            "cannot specify caCertificates or subjectAltNames",
        ),
        (
            "      mode: SIMPLE\n      caCertificates: /nonexistent/ca.pem\n",
            9,
            "spec.trafficPolicy.tls.caCertificates",
            "no such file",
        ),
        (
            "      mode: ISTIO_MUTUAL\n      clientCertificate: {cert}\n",
            9,
            "spec.trafficPolicy.tls.clientCertificate",
            "only with mode SIMPLE or MUTUAL",
        ),
        ("      mode: SIMPLE\n      sniHost: a\n", 9, "spec.trafficPolicy.tls.sniHost", "unknown"),
        (
            "      mode: SIMPLE\n    portLevelSettings:\n    - tls: {mode: SIMPLE}\n",
            10,
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "port number",
        ),
        (
            "      mode: SIMPLE\n    portLevelSettings:\n    - port: {number: 443}\n"
            "      portLevelSettings: []\n",
            11,
            "spec.trafficPolicy.portLevelSettings[0].portLevelSettings",
            "cannot have portLevelSettings",
        ),
    ],
)
def test_validation_errors_name_file_line_and_field(
    pki: Pki, fields: str, line: int, field: str, words: str
) -> None:
    text = DR + (
        fields.replace("{ca}", str(pki.ca))
        .replace("{cert}", str(pki.client_cert))
        .replace("{key}", str(pki.client_key))
    )
    with pytest.raises(ConfigErrors) as info:
        load(text)
    err = info.value.errors[0]
    assert (err.file, err.line, err.field) == ("dr.yaml", line, field)
    assert str(err).startswith(f"dr.yaml:{line}: {field}: ")
    assert words in str(err)


# -- precedence: IST MergeSubsetTrafficPolicy / GetPortLevelTrafficPolicy ---------------------------------

SIMPLE = TLSSettings("SIMPLE", sni="a")
MUTUAL = TLSSettings("MUTUAL", client_certificate="c", private_key="k")
RR = LoadBalancerSettings("ROUND_ROBIN")


def test_port_level_settings_replace_the_whole_policy_for_their_port() -> None:
    top = TrafficPolicy(
        load_balancer=RR, tls=SIMPLE, port_level=((8443, TrafficPolicy(tls=MUTUAL)), (9000, TrafficPolicy()))
    )
    assert merge_subset_policy(top, None, 8443) == TrafficPolicy(tls=MUTUAL)  # no RR: not inherited
    assert merge_subset_policy(top, None, 9000) == TrafficPolicy()  # an empty entry = the defaults
    assert merge_subset_policy(top, None, 80) == TrafficPolicy(load_balancer=RR, tls=SIMPLE)
    assert merge_subset_policy(top, None, None) == TrafficPolicy(load_balancer=RR, tls=SIMPLE)


def test_subset_sections_override_and_subset_port_level_replaces_all() -> None:
    top = TrafficPolicy(load_balancer=RR, tls=SIMPLE, port_level=((8443, TrafficPolicy(tls=MUTUAL)),))
    subset = TrafficPolicy(tls=MUTUAL, port_level=((9443, TrafficPolicy(load_balancer=RR)),))
    assert merge_subset_policy(top, subset, 80) == TrafficPolicy(load_balancer=RR, tls=MUTUAL)
    assert merge_subset_policy(top, subset, 9443) == TrafficPolicy(load_balancer=RR)  # tls -> default
    # the DR's port level first, then the subset's sections over it
    assert merge_subset_policy(top, TrafficPolicy(load_balancer=RR), 8443) == TrafficPolicy(RR, tls=MUTUAL)


def test_port_level_parsed_from_yaml(pki: Pki) -> None:
    cfg = load(
        DR + "      mode: SIMPLE\n      insecureSkipVerify: true\n    portLevelSettings:\n"
        "    - port: {number: 8443}\n"
        f"      tls: {{mode: SIMPLE, caCertificates: {pki.ca}}}\n"
    )
    policy = cfg.mesh.destination_rules[0].traffic_policy
    effective = merge_subset_policy(policy, None, 8443)
    assert effective.tls == TLSSettings("SIMPLE", ca_certificates=str(pki.ca))
    assert [t.insecure_skip_verify for t in policy_tls_settings([policy])] == [True, False]


# -- contexts and SAN checks ------------------------------------------------------------------------------


def test_context_checks_the_hostname_only_without_sni_and_sans(pki: Pki) -> None:
    auto = origination_context(TLSSettings("SIMPLE", ca_certificates=str(pki.ca)))
    assert (auto.verify_mode, auto.check_hostname) == (ssl.CERT_REQUIRED, True)
    with_sni = origination_context(TLSSettings("SIMPLE", ca_certificates=str(pki.ca), sni="x"))
    assert (with_sni.verify_mode, with_sni.check_hostname) == (ssl.CERT_REQUIRED, False)
    with_sans = origination_context(TLSSettings("SIMPLE", ("x",), ca_certificates=str(pki.ca)))
    assert with_sans.check_hostname is False
    insecure = origination_context(TLSSettings("SIMPLE", insecure_skip_verify=True))
    assert (insecure.verify_mode, insecure.check_hostname) == (ssl.CERT_NONE, False)


def test_mutual_context_loads_the_client_pair_and_bad_files_fail(pki: Pki, tmp_path: Path) -> None:
    origination_context(
        TLSSettings(
            "MUTUAL",
            ca_certificates=str(pki.ca),
            client_certificate=str(pki.client_cert),
            private_key=str(pki.client_key),
        )
    )
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ssl.SSLError):
        origination_context(TLSSettings("SIMPLE", ca_certificates=str(bogus)))


def test_san_matches_dns_uri_and_ip() -> None:
    cert = {
        "subjectAltName": (
            ("DNS", "*.example.com"),
            ("URI", "spiffe://td/ns/a/sa/b"),
            ("IP Address", "127.0.0.1"),
        )
    }
    assert san_matches(cert, ["api.example.com"])
    assert san_matches(cert, ["API.Example.com"])
    assert not san_matches(cert, ["a.b.example.com"])  # a wildcard covers one label
    assert not san_matches(cert, ["example.com"])
    assert san_matches(cert, ["spiffe://td/ns/a/sa/b"])
    assert not san_matches(cert, ["spiffe://td/ns/a/sa/c"])
    assert san_matches(cert, ["127.0.0.1"])
    assert not san_matches(cert, ["127.0.0.2"])
    assert not san_matches(None, ["api.example.com"])
    origination = Origination(ssl.create_default_context(), "api.example.com", ("other.example.org",))
    assert "none of the subjectAltNames" in origination.problem(cert)
    assert (
        Origination(ssl.create_default_context(), "x").problem(cert) == ""
    )  # no SANs: nothing more to check


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(_label, min_size=2, max_size=4), extra=_label)
def test_dns_san_equality_and_single_label_wildcards(labels: list[str], extra: str) -> None:
    name = ".".join(labels)
    assert san_matches({"subjectAltName": (("DNS", name.upper()),)}, [name])
    wildcard = {"subjectAltName": (("DNS", "*." + ".".join(labels[1:])),)}
    assert san_matches(wildcard, [name])
    assert not san_matches(wildcard, [f"{extra}.{name}"])


def test_the_documented_example_loads(tmp_path: Path) -> None:
    from tests.unit.proxy.test_redirect import docs_block

    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("payments-ca.pem", "shop-client.pem", "shop-client-key.pem"):
        (certs / name).write_text("")  # the loader checks that the files exist; contexts are built later
    cfg = load(docs_block("## TLS origination"), base=tmp_path)
    policy = cfg.mesh.destination_rules[0].traffic_policy
    assert merge_subset_policy(policy, None, 443).tls == TLSSettings(
        "MUTUAL",
        ca_certificates=str(certs / "payments-ca.pem"),
        client_certificate=str(certs / "shop-client.pem"),
        private_key=str(certs / "shop-client-key.pem"),
    )
    assert merge_subset_policy(policy, None, 8080).tls == TLSSettings("DISABLE")

"""The example files in policies/ load and mean what their comments say."""

from __future__ import annotations

from pathlib import Path

from authz.authn.model import jwt_rules_for, load_request_authentications
from authz.authn.settings import CertificateBinding, load_issuer_settings
from authz.request import Workload
from authz.resources import load_resources

POLICIES = Path(__file__).resolve().parents[3] / "policies"


def test_request_authentication_examples_load_and_select() -> None:
    ras = load_request_authentications(load_resources([POLICIES / "request-authn.yaml"]))
    reports = Workload(namespace="reports", labels={"app": "reports"})
    rules = jwt_rules_for(ras, reports, root_namespace="istio-system")
    assert [r.issuer for r in rules] == ["https://idp.example.com", "https://workload-idp.example.com"]
    assert rules[0].audiences == ("reports",) and rules[0].params == ()
    assert [r.issuer for r in jwt_rules_for(ras, Workload("other"), root_namespace="istio-system")] == [
        "https://workload-idp.example.com"
    ]


def test_issuer_settings_examples_load() -> None:
    settings = load_issuer_settings(load_resources([POLICIES / "jwt-issuer-settings.yaml"]))
    corp = settings.for_issuer("https://idp.example.com")
    assert corp.clock_skew == 30 and corp.certificate_binding is CertificateBinding.OPTIONAL
    workload = settings.for_issuer("https://workload-idp.example.com")
    assert workload.spiffe_binding is not None and workload.spiffe_binding.claim == "sub"

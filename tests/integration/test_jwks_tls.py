"""JWKS and discovery over HTTPS: the issuer's CA bundle (``JWTIssuerSettings.jwks.caBundleFile``) is the
only thing that makes an IdP with a private CA trusted; without it the fetch fails and tokens are 401."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.idp import TlsFiles, running_idp
from authz.request import HttpAttributes, Request
from authz.runtime import AuthzRuntime
from tests.integration.loop_thread import loop_thread
from tests.integration.test_idp_tls import _write, make_pki

pytestmark = [pytest.mark.integration]

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules: [{{issuer: "{issuer}", timeout: 2s}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: jwt-only, namespace: foo}}
spec:
  rules: [{{from: [{{source: {{requestPrincipals: ["*"]}}}}]}}]
"""
SETTINGS = """\
---
apiVersion: meshauthz.dev/v1alpha1
kind: JWTIssuerSettings
metadata: {{name: idp, namespace: istio-system}}
spec:
  issuer: "{issuer}"
  jwks: {{caBundleFile: "{ca}"}}
"""


@pytest.mark.parametrize("with_bundle", [True, False])
def test_private_ca_idp_is_trusted_only_with_its_bundle(tmp_path: Path, with_bundle: bool) -> None:
    files = _write(tmp_path, make_pki())
    with running_idp(tls=TlsFiles(cert=files["cert"], key=files["key"])) as idp, loop_thread() as lt:
        issuer = idp.issuer()
        assert issuer.issuer_url.startswith("https://127.0.0.1:")
        text = POLICIES.format(issuer=issuer.issuer_url)
        if with_bundle:
            text += SETTINGS.format(issuer=issuer.issuer_url, ca=files["ca"])
        (tmp_path / "policies").mkdir()
        (tmp_path / "policies" / "p.yaml").write_text(text)

        async def decide() -> tuple[bool, int, str]:
            runtime = AuthzRuntime([tmp_path / "policies"])
            try:
                request = Request(
                    http=HttpAttributes(
                        method="GET",
                        host="a",
                        path="/",
                        headers={"authorization": f"Bearer {issuer.mint(sub='alice')}"},
                    ),
                    context_extensions={"namespace": "foo"},
                )
                d = await runtime.check(request)
                return d.allowed, d.status, d.reason
            finally:
                await runtime.stop()

        allowed, status, reason = lt.run(decide())
    if with_bundle:
        assert (allowed, status) == (True, 200)
    else:
        assert (allowed, status) == (False, 401), reason

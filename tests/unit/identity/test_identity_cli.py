"""`authz ca init` / `authz ca issue`: files written, refusals with clear messages and exit codes."""

from __future__ import annotations

import argparse
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from authz.errors import ConfigError
from authz.identity import cli
from authz.identity.ca import load_ca


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="authz")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


def test_init_then_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "alice"
    assert run("ca", "init", "--trust-domain", "example.org", "--out", str(ca_dir)) == cli.EXIT_OK
    assert "example.org" in capsys.readouterr().out
    assert load_ca(ca_dir).trust_domain == "example.org"
    assert stat.S_IMODE((ca_dir / "ca-key.pem").stat().st_mode) == 0o600

    code = run(
        "ca", "issue", "spiffe://example.org/ns/shop/sa/alice", "--ca", str(ca_dir), "--out", str(out),
        "--validity", "2h", "--dns", "alice.shop.svc",
    )  # fmt: skip
    assert code == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert "spiffe://example.org/ns/shop/sa/alice" in printed
    assert {p.name for p in out.iterdir()} == {"cert.pem", "key.pem", "chain.pem", "bundle.pem"}
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(hours=2) <= lifetime <= timedelta(hours=2, minutes=1)


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("ca", "init", "--trust-domain", "td", "--out", str(tmp_path)) == cli.EXIT_OK
    first = (tmp_path / "ca-key.pem").read_bytes()
    assert run("ca", "init", "--trust-domain", "td", "--out", str(tmp_path)) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "authz ca: error:" in err and "--force" in err
    assert (tmp_path / "ca-key.pem").read_bytes() == first
    assert run("ca", "init", "--trust-domain", "td", "--out", str(tmp_path), "--force") == cli.EXIT_OK
    assert (tmp_path / "ca-key.pem").read_bytes() != first


@pytest.mark.parametrize(
    ("spiffe_id", "message"),
    [
        ("spiffe://other.org/ns/a/sa/b", "not in the CA's trust domain"),
        ("spiffe://td/ns/../sa/b", "'.' or '..'"),
        ("http://td/ns/a/sa/b", "must start with 'spiffe://'"),
    ],
)
def test_issue_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spiffe_id: str, message: str
) -> None:
    assert run("ca", "init", "--trust-domain", "td", "--out", str(tmp_path / "ca")) == cli.EXIT_OK
    capsys.readouterr()
    assert (
        run("ca", "issue", spiffe_id, "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "o"))
        == cli.EXIT_ERROR
    )
    err = capsys.readouterr().err
    assert err.startswith("authz ca: error: spiffe_id: ")
    assert message in err
    assert not (tmp_path / "o").exists()


def test_issue_without_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(
        "ca", "issue", "spiffe://td/a", "--ca", str(tmp_path / "missing"), "--out", str(tmp_path / "o")
    )
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "ca-cert.pem" in err and "authz ca init" in err


def test_init_bad_trust_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("ca", "init", "--trust-domain", "Bad_TD", "--out", str(tmp_path)) == cli.EXIT_ERROR
    assert "trust domain" in capsys.readouterr().err
    assert not (tmp_path / "ca-key.pem").exists()


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(
            "ca",
            "issue",
            "spiffe://td/a",
            "--ca",
            str(tmp_path),
            "--out",
            str(tmp_path),
            "--validity",
            "soon",
        )
    assert info.value.code == cli.EXIT_USAGE
    assert "not a duration" in capsys.readouterr().err
    assert run("ca") == cli.EXIT_USAGE


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400), ("365d", 365 * 86400), ("1h30m", 5400)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert cli.parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "h", "10", "1x", "-1h", "1h 2m", "4000d", "1.5h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        cli.parse_duration(text)
    assert info.value.reason == "invalid_validity"

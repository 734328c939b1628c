"""``authz envoy-config``: flags -> SidecarSpec, the typed envoy-data-plane check, and its refusals."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import pytest
import yaml

from authz.envoy import SidecarSpec, TlsFiles, config_cli, sidecar_bootstrap
from authz.envoy.config_cli import (
    check_typed,
    parse_hostport,
    render,
    spec_from_args,
    typed_bootstrap,
    with_listener_host,
)
from authz.errors import ConfigError

pytest.importorskip("envoy_data_plane", reason="pip install envoy-data-plane")

HCM_PATH = ("static_resources", "listeners", 0, "filter_chains", 0, "filters", 0, "typed_config")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    config_cli.register(sub)
    return parser.parse_args(["envoy-config", *argv])


def test_exported_names() -> None:
    assert set(config_cli.__all__) == {
        "DEFAULT_AUTHZ_GRPC", "DEFAULT_AUTHZ_HTTP", "EXIT_ERROR", "EXIT_OK", "INSTALL_HINT", "SVID_FILES",
        "check_typed", "parse_hostport", "register", "render", "spec_from_args", "typed_bootstrap",
        "with_listener_host",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9191", ("127.0.0.1", 9191)), (":80", ("127.0.0.1", 80)), ("[::1]:0", ("::1", 0)),
     ("authz:9192", ("authz", 9192))],
)  # fmt: skip
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, field="--x") == expected


@pytest.mark.parametrize("text", ["9191", "host:", "host:abc", "host:70000", "host:-1"])
def test_parse_hostport_refuses(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_hostport(text, field="--authz")
    assert err.value.field == "--authz" and err.value.reason == "invalid_address"


def test_flags_become_the_spec() -> None:
    args = parse("--mode", "http", "--app", "127.0.0.1:8081", "--listen", "127.0.0.1:15006",
                 "--namespace", "orders", "--labels", "app=orders,version=v1", "--svid", "/svid",
                 "--admin-port", "0", "--failure-mode-allow")  # fmt: skip
    spec = spec_from_args(args)
    assert spec.mode == "http" and (spec.authz_host, spec.authz_port) == ("127.0.0.1", 9192)
    assert (spec.app_host, spec.app_port, spec.listen_port, spec.admin_port) == ("127.0.0.1", 8081, 15006, 0)
    assert spec.labels == {"app": "orders", "version": "v1"} and spec.namespace == "orders"
    assert spec.tls == TlsFiles("/svid/chain.pem", "/svid/key.pem", "/svid/bundle.pem", True)
    assert spec.failure_mode_allow is True
    assert spec_from_args(parse()).authz_port == 9191  # gRPC default


def _types(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {v for k, v in node.items() if k == "@type"} | {t for v in node.values() for t in _types(v)}
    if isinstance(node, list):
        return {t for v in node for t in _types(v)}
    return set()


@pytest.mark.parametrize("mode", ["grpc", "http"])
@pytest.mark.parametrize("tls", [None, TlsFiles("c.pem", "k.pem", "b.pem")])
def test_render_is_the_typed_message_of_sidecar_bootstrap(mode: str, tls: TlsFiles | None) -> None:
    spec = SidecarSpec(mode=mode, tls=tls, namespace="orders", labels={"app": "orders"})  # type: ignore[arg-type]
    written = yaml.safe_load(render(spec))
    # Same message as the plain dict, in proto3 JSON names; every Any unpacked to a registered type.
    assert typed_bootstrap(written).to_dict() == typed_bootstrap(sidecar_bootstrap(spec)).to_dict() == written
    assert "staticResources" in written and "static_resources" not in written
    assert _types(written) == _types(sidecar_bootstrap(spec))
    assert json.loads(render(spec, output="json")) == written


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("static_resources", "listeners", 0, "bogus"), 1, "Unknown field 'bogus' in message Listener"),
        ((*HCM_PATH, "stat_prefixes"), "x", "Unknown field 'stat_prefixes' in message HttpConnectionManager"),
        (("static_resources", "listeners", 0, "address", "socket_address", "port_value"), "abc", "abc"),
    ],
)  # fmt: skip
def test_typed_check_names_what_envoy_would_reject(path: tuple[Any, ...], value: Any, needle: str) -> None:
    plain = sidecar_bootstrap(SidecarSpec())
    node: Any = plain
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        typed_bootstrap(plain)
    assert err.value.reason == "invalid_envoy_config" and needle in err.value.message


def test_unknown_type_url_is_refused() -> None:
    plain = sidecar_bootstrap(SidecarSpec())
    hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["@type"] = "type.googleapis.com/envoy.extensions.filters.network.nothing.v3.Nothing"
    with pytest.raises(ConfigError, match="unknown type"):
        typed_bootstrap(plain)


def test_check_typed_catches_a_spec_mismatch() -> None:
    typed = typed_bootstrap(sidecar_bootstrap(SidecarSpec(namespace="orders")))
    check_typed(typed, SidecarSpec(namespace="orders"))
    with pytest.raises(ConfigError, match="namespace"):
        check_typed(typed, SidecarSpec(namespace="billing"))
    with pytest.raises(ConfigError, match="TLS"):
        check_typed(typed, SidecarSpec(namespace="orders", tls=TlsFiles("c", "k", "b")))
    with pytest.raises(ConfigError, match="http service"):
        check_typed(typed, SidecarSpec(namespace="orders", mode="http"))


def test_service_names_resolve_by_dns_and_admin_stays_on_loopback() -> None:
    spec = SidecarSpec(app_host="orders", authz_host="authz", tls=TlsFiles("c", "k", "b"))
    written = yaml.safe_load(render(spec, listen_host="0.0.0.0"))
    resources = written["staticResources"]
    assert resources["listeners"][0]["address"]["socketAddress"]["address"] == "0.0.0.0"
    assert {c["name"]: c["type"] for c in resources["clusters"]} == {
        "app": "STRICT_DNS",
        "meshauthz": "STRICT_DNS",
    }
    assert written["admin"]["address"]["socketAddress"]["address"] == "127.0.0.1"
    plain = with_listener_host(sidecar_bootstrap(SidecarSpec()), "0.0.0.0")
    assert {c["type"] for c in plain["static_resources"]["clusters"]} == {"STATIC"}  # IP literals stay STATIC


def test_the_command_refuses_a_missing_svid(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--svid", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b.yaml"))
    assert args.func(args) == config_cli.EXIT_ERROR
    assert "missing_svid" in capsys.readouterr().err
    assert not (tmp_path / "b.yaml").exists()


def test_the_command_writes_the_file(tmp_path: Any) -> None:
    args = parse("--out", str(tmp_path / "sub" / "b.yaml"), "--namespace", "orders")
    assert args.func(args) == config_cli.EXIT_OK
    data = yaml.safe_load((tmp_path / "sub" / "b.yaml").read_text())
    assert data["admin"]["address"]["socketAddress"]["portValue"] == 15000


def test_envoy_data_plane_stays_off_the_cli_import_path() -> None:
    code = (
        "import sys, authz.envoy.config_cli, authz.launcher.cli, authz.launcher.mesh;"
        "print(any(m.startswith('envoy_data_plane') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"

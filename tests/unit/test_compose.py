"""docker-compose.yml without a Docker engine: schema sanity, and every command, file and port it names
exists and matches the CLI (each ``command`` of the project image parses with ``authz.cli.build_parser``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.cli import build_parser
from authz.envoy import config_cli
from authz.launcher import cli as launcher_cli
from authz.launcher.mesh import rewrite_issuer

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40-latest"
COMPOSE_ISSUER = "http://idp:9000/issuers/demo"
# How `authz envoy-config` wrote deploy/envoy-orders.yaml (regenerated below: the file may never drift).
ENVOY_CONFIG_ARGS = [
    "--authz", "authz:9191", "--app", "orders-v1:8081", "--listen", "0.0.0.0:15006", "--admin-port", "15000",
    "--namespace", "orders", "--labels", "app=orders,version=v1", "--svid", "/certs/orders",
    "--no-check-files",
]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The ``authz`` parser, with this package's commands even before the lead lists them."""
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for module in (config_cli, launcher_cli):
        names = {"envoy-config"} if module is config_cli else {"run", "demo"}
        if not names <= set(sub.choices):
            module.register(sub)
    return p


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = compose["services"]
    assert isinstance(out, dict) and out
    return out


def project_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services(compose).items() if s.get("build") == "."}


def host_path(container_path: str, service: dict[str, Any]) -> Path | None:
    """Where a path inside a container comes from in the checkout (None: a named volume, e.g. /certs)."""
    if container_path.startswith("/app/"):  # the Dockerfile copies the checkout's files to /app
        return REPO / container_path.removeprefix("/app/")
    for volume in service.get("volumes", []):
        source, _, target = volume.partition(":")
        target = target.split(":")[0]
        if container_path.startswith(target + "/") and source.startswith("./"):
            return REPO / source / container_path.removeprefix(target + "/")
    return None


def test_every_service_has_an_image_or_the_project_build(compose: dict[str, Any]) -> None:
    assert set(services(compose)) >= {"ca", "idp", "authz", "orders-v1", "envoy-orders", "frontend"}
    for name, service in services(compose).items():
        assert service.get("build") == "." or service.get("image") == ENVOY_IMAGE, name
        assert isinstance(service["command"], list) and all(isinstance(a, str) for a in service["command"]), (
            name
        )
        for dep in service.get("depends_on", []):
            assert dep in services(compose), f"{name} depends on unknown service {dep}"
    assert (REPO / "Dockerfile").is_file()
    assert 'ENTRYPOINT ["authz"]' in (REPO / "Dockerfile").read_text()


def test_every_project_command_parses_with_the_cli(compose: dict[str, Any]) -> None:
    p = parser()
    for name, service in project_services(compose).items():
        try:
            args = p.parse_args(service["command"])
        except SystemExit:  # argparse reports the error on stderr
            pytest.fail(f"{name}: `authz {' '.join(service['command'])}` does not parse")
        assert callable(args.func), name


def test_every_file_a_command_names_exists(compose: dict[str, Any]) -> None:
    named = 0
    for name, service in services(compose).items():
        for arg in service["command"]:
            if arg.startswith("/") and not arg.startswith("/certs"):
                path = host_path(arg, service)
                assert path is not None and path.exists(), f"{name}: {arg} is not in the checkout"
                named += 1
    assert named >= 3  # idp config, policies, envoy bootstrap


def test_certificates_are_minted_where_they_are_read(compose: dict[str, Any]) -> None:
    minted = {
        s["command"][s["command"].index("--out") + 1]
        for s in project_services(compose).values()
        if s["command"][:2] in (["ca", "issue"], ["ca", "init"])
    }
    envoy_text = (REPO / "deploy" / "envoy-orders.yaml").read_text()
    read = set(re.findall(r"(/certs/[a-z-]+)/", envoy_text))
    for service in project_services(compose).values():
        cmd = service["command"]
        if "--svid" in cmd:
            read.add(cmd[cmd.index("--svid") + 1])
    assert read and read <= minted, f"read {read} but minted only {minted}"


def _listen_ports(command: list[str]) -> set[int]:
    ports = set()
    for flag in ("--port", "--grpc", "--http", "--admin"):
        if flag in command:
            ports.add(int(command[command.index(flag) + 1].rsplit(":", 1)[-1]))
    return ports


def test_published_ports_are_the_ports_the_commands_listen_on(compose: dict[str, Any]) -> None:
    envoy = yaml.safe_load((REPO / "deploy" / "envoy-orders.yaml").read_text())
    envoy_port = envoy["staticResources"]["listeners"][0]["address"]["socketAddress"]["portValue"]
    published = 0
    for name, service in services(compose).items():
        listening = {envoy_port} if service.get("image") == ENVOY_IMAGE else _listen_ports(service["command"])
        for mapping in service.get("ports", []):
            host_ip, host_port, container_port = mapping.split(":")
            assert host_ip == "127.0.0.1", f"{name}: publish on loopback only"
            assert int(container_port) in listening, f"{name}: {container_port} is not what it listens on"
            assert 1024 <= int(host_port) <= 65535
            published += 1
    assert published >= 4


def test_upstreams_point_at_the_services_that_listen(compose: dict[str, Any]) -> None:
    svc = services(compose)
    envoy = yaml.safe_load((REPO / "deploy" / "envoy-orders.yaml").read_text())
    for cluster in envoy["staticResources"]["clusters"]:
        address = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
        host, port = address["socketAddress"]["address"], address["socketAddress"]["portValue"]
        assert host in svc and port in _listen_ports(svc[host]["command"]), cluster["name"]
    frontend = svc["frontend"]["command"]
    upstream = frontend[frontend.index("--upstream") + 1]
    assert upstream == "https://envoy-orders:15006"


def test_envoy_bootstrap_is_the_output_of_envoy_config() -> None:
    pytest.importorskip("envoy_data_plane", reason="pip install envoy-data-plane")
    args = parser().parse_args(["envoy-config", *ENVOY_CONFIG_ARGS])
    expected = config_cli.render(config_cli.spec_from_args(args), listen_host="0.0.0.0")
    assert (REPO / "deploy" / "envoy-orders.yaml").read_text() == expected, (
        "regenerate: authz envoy-config " + " ".join(ENVOY_CONFIG_ARGS) + " --out deploy/envoy-orders.yaml"
    )


def test_compose_policies_are_the_demo_policies_with_the_compose_issuer() -> None:
    demo = (REPO / "policies" / "demo" / "mesh.yaml").read_text()
    compose_text = (REPO / "deploy" / "policies" / "mesh.yaml").read_text()
    body = compose_text.split("\n", 1)[1]  # after the GENERATED header line
    assert body == rewrite_issuer(demo, COMPOSE_ISSUER)
    idp = yaml.safe_load((REPO / "deploy" / "idp.yaml").read_text())
    assert f"{idp['spec']['publicUrl']}/issuers/{idp['spec']['issuers'][0]['name']}" == COMPOSE_ISSUER
    assert all("clientSecret" not in c for c in idp["spec"]["issuers"][0]["clients"])  # generated at start

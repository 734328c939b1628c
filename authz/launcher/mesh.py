"""The local mesh as data: ports, identities, files and processes. Pure: nothing here touches the disk,
the network or a process; :mod:`authz.launcher.cli` does, from these values.

Topology (``base`` = ``--base-port``, default 9000; every port is ``base + offset`` on 127.0.0.1)::

    curl --> frontend (base+80) --mTLS as spiffe://cluster.local/ns/shop/sa/frontend-->
             Envoy sidecar of orders v1 (base+443, admin base+901) --ext_authz gRPC--> authz serve (base+191)
             --> orders v1 app (base+81)
    authz serve: gRPC base+191, HTTP base+192, admin base+193   mock IdP: base+0 (issuer /issuers/demo)
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from authz.launcher.supervisor import ChildSpec

__all__ = [
    "DEFAULT_BASE_PORT",
    "DEMO_AUDIENCE",
    "DEMO_CLIENT_ID",
    "DEMO_ISSUER",
    "ISSUER_URL_IN_FILES",
    "PORT_OFFSETS",
    "TRUST_DOMAIN",
    "WORKLOADS",
    "MeshLayout",
    "MeshState",
    "Ports",
    "child_specs",
    "curl_lines",
    "idp_config_text",
    "rewrite_issuer",
    "spiffe_id",
    "summary_text",
]

# 9000 puts the authorizer on the README's fixed ports (9191/9192/9193) and the IdP on its default 9000.
DEFAULT_BASE_PORT = 9000
TRUST_DOMAIN = "cluster.local"  # Istio's default trust domain (MeshConfig.trustDomain)
DEMO_ISSUER = "demo"
DEMO_CLIENT_ID = "orders-service"
DEMO_AUDIENCE = "orders-api"
# policies/demo name the issuer at the default base port; a copy is rewritten for any other.
ISSUER_URL_IN_FILES = f"http://127.0.0.1:{DEFAULT_BASE_PORT}/issuers/{DEMO_ISSUER}"
# name -> (namespace, service account); the SPIFFE ID is spiffe://TRUST_DOMAIN/ns/<ns>/sa/<sa>.
WORKLOADS: Mapping[str, tuple[str, str]] = {
    "frontend": ("shop", "frontend"),
    "orders": ("orders", "orders"),
    "intruder": ("shop", "intruder"),
}
PORT_OFFSETS: Mapping[str, tuple[int, str]] = {
    "idp": (0, "mock OIDC IdP"),
    "frontend": (80, "frontend app (plain HTTP, the way in)"),
    "orders_v1": (81, "orders v1 app"),
    "authz_grpc": (191, "authorizer gRPC ext_authz"),
    "authz_http": (192, "authorizer HTTP ext_authz"),
    "authz_admin": (193, "authorizer admin (/readyz /metrics /config_dump)"),
    "orders_envoy": (443, "Envoy sidecar of orders v1 (mTLS)"),
    "envoy_admin": (901, "Envoy admin"),
}
_MAX_OFFSET = max(offset for offset, _ in PORT_OFFSETS.values())


def spiffe_id(workload: str) -> str:
    namespace, account = WORKLOADS[workload]
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}"


@dataclass(frozen=True)
class Ports:
    """Every port of the mesh, ``base + offset``."""

    base: int = DEFAULT_BASE_PORT

    def __post_init__(self) -> None:
        if not 1024 <= self.base <= 65535 - _MAX_OFFSET:
            raise ValueError(f"--base-port must be within 1024..{65535 - _MAX_OFFSET}, got {self.base}")

    def __getitem__(self, name: str) -> int:
        return self.base + PORT_OFFSETS[name][0]

    def described(self) -> list[tuple[str, int, str]]:
        """(name, port, what) for every port, in port order."""
        return sorted(((n, self[n], what) for n, (_, what) in PORT_OFFSETS.items()), key=lambda t: t[1])


@dataclass(frozen=True)
class MeshLayout:
    """Where ``authz run`` keeps its files (``.run/``, gitignored: keys never reach git)."""

    run_dir: Path

    @property
    def ca_dir(self) -> Path:
        return self.run_dir / "ca"

    def svid_dir(self, workload: str) -> Path:
        return self.run_dir / "svid" / workload

    @property
    def policies_dir(self) -> Path:
        return self.run_dir / "policies"

    @property
    def idp_config(self) -> Path:
        return self.run_dir / "idp.yaml"

    @property
    def envoy_config(self) -> Path:
        return self.run_dir / "envoy-orders.yaml"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"


def idp_config_text(client_secret: str) -> str:
    """The mock IdP for the demo: one issuer, one client_credentials client (secret generated per run)."""
    return f"""# Written by `authz run` for this run only; the client secret is generated at start.
apiVersion: meshauthz.dev/v1alpha1
kind: MockIdentityProvider
metadata: {{name: local-mesh}}
spec:
  issuers:
  - name: {DEMO_ISSUER}
    keys: [{{alg: RS256}}]
    audience: [{DEMO_AUDIENCE}]
    accessTokenTtlSeconds: 900
    jwksMaxAgeSeconds: 60
    clients:
    - clientId: {DEMO_CLIENT_ID}
      clientSecret: {json.dumps(client_secret)}
      grantTypes: [client_credentials]
      scopes: [orders.read]
"""


def rewrite_issuer(text: str, issuer_url: str) -> str:
    """``policies/demo`` text with the issuer at the default base port replaced by ``issuer_url``."""
    return text.replace(ISSUER_URL_IN_FILES, issuer_url)


@dataclass(frozen=True)
class MeshState:
    """What ``authz run`` started, written to ``state.json`` for ``authz demo`` and for humans."""

    base_port: int
    run_dir: str
    authz_command: list[str]
    policies_dir: str
    idp_url: str
    issuer_url: str
    client_id: str
    client_secret: str
    frontend_url: str
    orders_url: str
    envoy_mode: str
    svids: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def token_url(self) -> str:
        return f"{self.issuer_url}/token"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> MeshState:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


def child_specs(
    state: MeshState, layout: MeshLayout, *, python: str, envoy: str, ports: Ports
) -> list[ChildSpec]:
    """The processes, in start order (the IdP first: the authorizer discovers its keys)."""
    authz = tuple(state.authz_command)
    apps = (python, "-m", "authz.launcher.apps")
    loop = "127.0.0.1"
    return [
        ChildSpec(
            "idp",
            (*authz, "idp", "--config", str(layout.idp_config), "--host", loop, "--port", str(ports["idp"]),
             "--log-level", "warning"),
            ready_url=f"{state.idp_url}/healthz",
            description=f"mock IdP, issuer {state.issuer_url}",
        ),
        ChildSpec(
            "authz",
            (*authz, "serve", "--policies", str(layout.policies_dir),
             "--grpc", f"{loop}:{ports['authz_grpc']}", "--http", f"{loop}:{ports['authz_http']}",
             "--admin", f"{loop}:{ports['authz_admin']}", "--namespace", "orders",
             "--decision-log", str(layout.log_dir / "decisions.jsonl")),
            ready_url=f"http://{loop}:{ports['authz_admin']}/readyz",
            description=f"authorizer with {state.policies_dir}",
        ),
        ChildSpec(
            "orders-v1",
            (*apps, "orders", "--port", str(ports["orders_v1"]), "--version", "v1"),
            ready_url=f"http://{loop}:{ports['orders_v1']}/healthz",
            description="orders v1 app",
        ),
        ChildSpec(
            "envoy-orders",
            (envoy, "-c", str(layout.envoy_config), "--disable-hot-restart", "--log-level", "warning",
             "--concurrency", "1"),
            ready_url=f"http://{loop}:{ports['envoy_admin']}/ready",
            description=f"Envoy sidecar of orders v1, ext_authz {state.envoy_mode}",
        ),
        ChildSpec(
            "frontend",
            (*apps, "frontend", "--port", str(ports["frontend"]), "--upstream", state.orders_url,
             "--svid", state.svids["frontend"]),
            ready_url=f"{state.frontend_url}/healthz",
            description=f"frontend app, calls orders as {spiffe_id('frontend')}",
        ),
    ]  # fmt: skip


def curl_lines(state: MeshState, authz_text: str) -> list[str]:
    """The commands to try, ready to paste."""
    token = f"TOKEN=$({authz_text} demo token --run-dir {shlex.quote(state.run_dir)})"
    intruder = state.svids["intruder"]
    return [
        f"curl -i {state.frontend_url}/orders                                # no token: 403",
        f"curl -i -H 'Authorization: Bearer not-a-jwt' {state.frontend_url}/orders  # bad token: 401",
        token,
        f'curl -s -H "Authorization: Bearer $TOKEN" {state.frontend_url}/orders   # 200, identity headers',
        f"curl -i --cacert {intruder}/bundle.pem --cert {intruder}/chain.pem --key {intruder}/key.pem \\\n"
        f'     -H "Authorization: Bearer $TOKEN" {state.orders_url.replace("127.0.0.1", "localhost")}/orders'
        "   # another workload: 403",
        f"{authz_text} demo --run-dir {shlex.quote(state.run_dir)}      # the whole story, step by step",
    ]


def summary_text(state: MeshState, ports: Ports, children: list[ChildSpec], authz_text: str) -> str:
    lines = ["", f"local mesh up (run dir {state.run_dir}, logs in {state.run_dir}/logs):"]
    lines += [f"  {port:5}  {what}" for _, port, what in ports.described()]
    lines += ["", "processes:"]
    lines += [f"  {c.name:13} pid {state.pids.get(c.name, 0):<7} {c.description}" for c in children]
    lines += ["", "try:"]
    lines += [f"  {line}" for line in curl_lines(state, authz_text)]
    lines += ["", "Ctrl-C stops everything."]
    return "\n".join(lines)

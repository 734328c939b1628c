"""The local mesh as data: ports, identities, files and processes. Pure: nothing here touches the disk,
the network or a process; :mod:`authz.launcher.cli` does, from these values.

Topology (``base`` = ``--base-port``, default 9000; every port is ``base + offset`` on 127.0.0.1)::

    curl --> frontend app (base+80) --plain HTTP, Host orders.orders.svc.cluster.local-->
             bundled proxy, frontend's sidecar (outbound base+501, admin base+903): VirtualService canary
               90% --mTLS as spiffe://cluster.local/ns/shop/sa/frontend--> Envoy sidecar of orders v1
                    (base+443, admin base+901) --ext_authz gRPC--> authz serve (base+191)
                    --> orders v1 app (base+81)
               10% --mTLS, same SVID--> bundled proxy, orders v2's sidecar (inbound base+444, admin base+902):
                    in-process authorizer (``mode: local``, same policies) --> orders v2 app (base+82)
               100% mirrored (fire and forget, Host ``...-shadow``) --> shadow app (base+83)
    authz serve: gRPC base+191, HTTP base+192, admin base+193   mock IdP: base+0 (issuer /issuers/demo)

The bundled proxies read Istio ``ServiceEntry``/``DestinationRule``/``VirtualService`` files under
``<run dir>/proxy/<workload>/`` and reload them on change, which is how ``authz demo`` moves the canary.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from authz.launcher.supervisor import ChildSpec

__all__ = [
    "COMPOSE_HOSTS",
    "COMPOSE_PORTS",
    "DEFAULT_BASE_PORT",
    "DEMO_AUDIENCE",
    "DEMO_CLIENT_ID",
    "DEMO_ISSUER",
    "INITIAL_CANARY_WEIGHTS",
    "ISSUER_URL_IN_FILES",
    "LOOPBACK",
    "MIRROR_PERCENT",
    "ORDERS_HOST",
    "PORT_OFFSETS",
    "TRUST_DOMAIN",
    "WORKLOADS",
    "MeshLayout",
    "MeshState",
    "PortLookup",
    "Ports",
    "canary_virtual_service_text",
    "canary_weights",
    "child_specs",
    "compose_proxy_files",
    "curl_lines",
    "frontend_proxy_text",
    "idp_config_text",
    "orders_service_text",
    "orders_v2_proxy_text",
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
    "orders_v2": (82, "orders v2 app"),
    "shadow": (83, "orders shadow app (receives the mirrored copies)"),
    "authz_grpc": (191, "authorizer gRPC ext_authz"),
    "authz_http": (192, "authorizer HTTP ext_authz"),
    "authz_admin": (193, "authorizer admin (/readyz /metrics /config_dump)"),
    "orders_envoy": (443, "Envoy sidecar of orders v1 (mTLS, ext_authz)"),
    "orders_v2_proxy": (444, "bundled proxy sidecar of orders v2 (mTLS, in-process authz)"),
    "frontend_proxy": (501, "bundled proxy sidecar of frontend, outbound (canary + mirror)"),
    "envoy_admin": (901, "Envoy admin"),
    "orders_v2_proxy_admin": (902, "bundled proxy admin of orders v2 (/metrics /ready)"),
    "frontend_proxy_admin": (903, "bundled proxy admin of frontend (/metrics /ready)"),
}
# The orders service as the frontend's sidecar knows it (Istio's name for service `orders` in namespace
# `orders`); the frontend app sends this Host, the way an app in a mesh calls http://orders.orders/.
ORDERS_HOST = "orders.orders.svc.cluster.local"
INITIAL_CANARY_WEIGHTS = (90, 10)  # orders v1, v2: the canary starts with a tenth of the traffic
MIRROR_PERCENT = 100.0  # every request routed to orders is also copied to the shadow
LOOPBACK = "127.0.0.1"
# The container ports of docker-compose.yml (Istio's sidecar ports: 15001 outbound, 15006 inbound, 15000
# admin); deploy/proxy/ is compose_proxy_files() of these, checked by tests/unit/test_compose.py.
COMPOSE_PORTS: Mapping[str, int] = {
    "orders_envoy": 15006,
    "orders_v2_proxy": 15006,
    "orders_v2_proxy_admin": 15000,
    "orders_v2": 8082,
    "shadow": 8083,
    "frontend_proxy": 15001,
    "frontend_proxy_admin": 15000,
}
COMPOSE_HOSTS: Mapping[str, str] = {
    "orders_envoy": "envoy-orders",
    "orders_v2_proxy": "proxy-orders-v2",
    "shadow": "shadow",
}


class PortLookup(Protocol):
    """:class:`Ports` or a plain mapping: the port of a named listener."""

    def __getitem__(self, name: str, /) -> int: ...


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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

    def proxy_dir(self, workload: str) -> Path:
        """The configuration folder of a bundled proxy (``authz proxy --config`` watches it)."""
        return self.run_dir / "proxy" / workload

    @property
    def canary_file(self) -> Path:
        """The VirtualService that splits orders between v1 and v2: edit it and the proxy reloads."""
        return self.proxy_dir("frontend") / "orders-virtualservice.yaml"

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


def frontend_proxy_text(ports: PortLookup, svid_dir: Path, *, listen: str = LOOPBACK) -> str:
    """The frontend's bundled sidecar: outbound only (the frontend app calls it in plain HTTP), mTLS to
    the orders sidecars with the frontend's SVID; no inbound, so no authorizer (``mode: none``)."""
    return f"""# The frontend's sidecar, the bundled proxy (authz proxy --config <this folder>).
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: frontend, namespace: shop}}
spec:
  workload:
    namespace: shop
    serviceAccount: frontend
    labels: {{app: frontend, version: v1}}
  trustDomain: {TRUST_DOMAIN}
  outbound: {{address: {listen}, port: {ports["frontend_proxy"]}}}
  admin: {{address: {listen}, port: {ports["frontend_proxy_admin"]}}}
  identity: {{certDir: {json.dumps(str(svid_dir))}}}
  authorizer: {{mode: none}}
"""


def orders_service_text(ports: PortLookup, hosts: Mapping[str, str] | None = None) -> str:
    """ServiceEntry and DestinationRule of ``orders``: v1 (Envoy) and v2 (bundled proxy) sidecars, and the
    shadow app without a sidecar. Endpoints labelled ``security.istio.io/tlsMode: istio`` get mTLS
    (Istio auto mTLS); ``serviceAccount`` is the SPIFFE ID the client checks on the server's SVID.

    ``hosts`` names the host of ``orders_envoy``, ``orders_v2_proxy`` and ``shadow`` where it is not
    loopback (docker-compose); names make the resolution ``DNS`` (Istio ServiceEntry ``Resolution``:
    STATIC takes the endpoints' IP addresses, DNS resolves the endpoints' names)."""
    where = {k: (hosts or {}).get(k, LOOPBACK) for k in ("orders_envoy", "orders_v2_proxy", "shadow")}
    resolution = "STATIC" if all(_is_ip(h) for h in where.values()) else "DNS"
    return f"""# Where `orders` runs, and its subsets (read by the frontend's sidecar).
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: orders, namespace: orders}}
spec:
  hosts: [{ORDERS_HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: {resolution}
  endpoints:
  - address: {where["orders_envoy"]}  # Envoy sidecar of orders v1 (ext_authz to authz serve)
    ports: {{http: {ports["orders_envoy"]}}}
    labels: {{app: orders, version: v1, security.istio.io/tlsMode: istio}}
    serviceAccount: orders
  - address: {where["orders_v2_proxy"]}  # bundled proxy sidecar of orders v2 (in-process authz)
    ports: {{http: {ports["orders_v2_proxy"]}}}
    labels: {{app: orders, version: v2, security.istio.io/tlsMode: istio}}
    serviceAccount: orders
  - address: {where["shadow"]}  # the shadow app: no sidecar, plain HTTP
    ports: {{http: {ports["shadow"]}}}
    labels: {{app: orders, version: shadow}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: orders, namespace: orders}}
spec:
  host: orders
  trafficPolicy:
    connectionPool:
      tcp: {{connectTimeout: 1s}}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
  - name: shadow
    labels: {{version: shadow}}
"""


def canary_virtual_service_text(
    v1_weight: int, v2_weight: int, mirror_percent: float = MIRROR_PERCENT
) -> str:
    """The canary route: ``v1_weight``/``v2_weight`` split (relative weights, Istio VS l.940-955), every
    request also mirrored to the shadow subset (``mirrorPercentage``, IST route.go MirrorPercent)."""
    return f"""# The canary: `authz demo` edits the weights; the frontend's sidecar reloads this file.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: orders, namespace: orders}}
spec:
  hosts: [orders]
  http:
  - name: orders-canary
    route:
    - destination: {{host: orders, subset: v1}}
      weight: {v1_weight}
    - destination: {{host: orders, subset: v2}}
      weight: {v2_weight}
    mirror: {{host: orders, subset: shadow}}
    mirrorPercentage: {{value: {mirror_percent:g}}}
    timeout: 10s
"""


def canary_weights(text: str) -> dict[str, int]:
    """The weight of each subset in the first ``http`` route of a VirtualService (``{"v1": 90, ...}``).

    A destination without a weight gets 100 when it is alone, else 0 (Istio VS l.940-955). Raises
    ``ValueError`` when ``text`` holds no VirtualService with a route."""
    for doc in yaml.safe_load_all(text):
        if not isinstance(doc, dict) or doc.get("kind") != "VirtualService":
            continue
        http = (doc.get("spec") or {}).get("http") or []
        if not http or not isinstance(http[0], dict):
            break
        routes = http[0].get("route") or []
        default = 100 if len(routes) == 1 else 0
        return {
            str((r.get("destination") or {}).get("subset", "")): int(r.get("weight", default))
            for r in routes
            if isinstance(r, dict)
        }
    raise ValueError("no VirtualService with an http route")


def orders_v2_proxy_text(
    ports: PortLookup,
    svid_dir: Path,
    policies_dir: Path,
    *,
    listen: str = LOOPBACK,
    app_host: str = LOOPBACK,
) -> str:
    """Orders v2's bundled sidecar: mTLS inbound (STRICT) with the orders SVID, authorization in process
    (``mode: local``: the engine of ``authz serve``, same policy files), then the v2 app."""
    return f"""# Orders v2's sidecar, the bundled proxy (authz proxy --config <this folder>).
apiVersion: meshauthz.dev/v1alpha1
kind: ProxyConfig
metadata: {{name: orders-v2, namespace: orders}}
spec:
  workload:
    namespace: orders
    serviceAccount: orders
    labels: {{app: orders, version: v2}}
  trustDomain: {TRUST_DOMAIN}
  inbound:
    address: {listen}
    port: {ports["orders_v2_proxy"]}
    appAddress: {app_host}
    appPort: {ports["orders_v2"]}
  admin: {{address: {listen}, port: {ports["orders_v2_proxy_admin"]}}}
  identity: {{certDir: {json.dumps(str(svid_dir))}}}
  authorizer:
    mode: local
    policies: [{json.dumps(str(policies_dir))}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec:
  mtls: {{mode: STRICT}}
"""


def compose_proxy_files() -> dict[str, str]:
    """The bundled proxies' folders of docker-compose.yml, by path under ``deploy/``: the same files as
    ``authz run`` writes, with container ports and service names."""
    certs = Path("/certs")
    return {
        "proxy/frontend/proxy.yaml": frontend_proxy_text(COMPOSE_PORTS, certs / "frontend", listen="0.0.0.0"),
        "proxy/frontend/orders-service.yaml": orders_service_text(COMPOSE_PORTS, COMPOSE_HOSTS),
        "proxy/frontend/orders-virtualservice.yaml": canary_virtual_service_text(*INITIAL_CANARY_WEIGHTS),
        "proxy/orders-v2/proxy.yaml": orders_v2_proxy_text(
            COMPOSE_PORTS,
            certs / "orders",
            Path("/app/deploy/policies"),
            listen="0.0.0.0",
            app_host="orders-v2",
        ),
    }


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
    # The canary (empty in a state.json written before the bundled proxy joined the mesh).
    canary_file: str = ""
    frontend_proxy_admin_url: str = ""
    app_urls: dict[str, str] = field(default_factory=dict)  # orders-v1, orders-v2, shadow (plain HTTP)

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
            "orders-v2",
            (*apps, "orders", "--port", str(ports["orders_v2"]), "--version", "v2"),
            ready_url=f"http://{loop}:{ports['orders_v2']}/healthz",
            description="orders v2 app (the canary)",
        ),
        ChildSpec(
            "proxy-orders-v2",
            (*authz, "proxy", "--config", str(layout.proxy_dir("orders-v2")), "--log-level", "info"),
            ready_url=f"http://{loop}:{ports['orders_v2_proxy_admin']}/ready",
            description="bundled proxy sidecar of orders v2, mTLS, authorizer in process (mode local)",
        ),
        ChildSpec(
            "shadow",
            (*apps, "shadow", "--port", str(ports["shadow"])),
            ready_url=f"http://{loop}:{ports['shadow']}/healthz",
            description="shadow app, receives the mirrored copies",
        ),
        ChildSpec(
            "proxy-frontend",
            (*authz, "proxy", "--config", str(layout.proxy_dir("frontend")), "--log-level", "info"),
            ready_url=f"http://{loop}:{ports['frontend_proxy_admin']}/ready",
            description=f"bundled proxy sidecar of frontend: canary v1/v2 + mirror, mTLS as "
            f"{spiffe_id('frontend')}; routes in {layout.canary_file}",
        ),
        ChildSpec(
            "frontend",
            (*apps, "frontend", "--port", str(ports["frontend"]),
             "--upstream", f"http://{loop}:{ports['frontend_proxy']}", "--upstream-host", ORDERS_HOST),
            ready_url=f"{state.frontend_url}/healthz",
            description=f"frontend app, calls http://{ORDERS_HOST} through its sidecar",
        ),
    ]  # fmt: skip


def curl_lines(state: MeshState, authz_text: str) -> list[str]:
    """The commands to try, ready to paste."""
    token = f"TOKEN=$({authz_text} demo token --run-dir {shlex.quote(state.run_dir)})"
    intruder = state.svids["intruder"]
    lines = [
        f"curl -i {state.frontend_url}/orders                                # no token: 403",
        f"curl -i -H 'Authorization: Bearer not-a-jwt' {state.frontend_url}/orders  # bad token: 401",
        token,
        f'curl -s -H "Authorization: Bearer $TOKEN" {state.frontend_url}/orders   # 200, identity headers',
        f"curl -i --cacert {intruder}/bundle.pem --cert {intruder}/chain.pem --key {intruder}/key.pem \\\n"
        f'     -H "Authorization: Bearer $TOKEN" {state.orders_url.replace("127.0.0.1", "localhost")}/orders'
        "   # another workload: 403",
        f"{authz_text} demo --run-dir {shlex.quote(state.run_dir)}      # the whole story, step by step",
    ]
    if state.canary_file:
        v1, v2 = INITIAL_CANARY_WEIGHTS
        lines += [
            f"$EDITOR {state.canary_file}   # weights {v1}/{v2}: the frontend's sidecar reloads on save",
            f"curl -s {state.app_urls.get('shadow', '')}/_stats   # the copies the shadow received "
            '("shadow": n)',
        ]
    return lines


def summary_text(state: MeshState, ports: Ports, children: list[ChildSpec], authz_text: str) -> str:
    lines = ["", f"local mesh up (run dir {state.run_dir}, logs in {state.run_dir}/logs):"]
    lines += [f"  {port:5}  {what}" for _, port, what in ports.described()]
    lines += ["", "processes:"]
    lines += [f"  {c.name:15} pid {state.pids.get(c.name, 0):<7} {c.description}" for c in children]
    lines += ["", "try:"]
    lines += [f"  {line}" for line in curl_lines(state, authz_text)]
    lines += ["", "Ctrl-C stops everything."]
    return "\n".join(lines)

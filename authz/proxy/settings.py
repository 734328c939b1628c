"""The sidecar's own settings (kind ``ProxyConfig``, ``meshauthz.dev/v1alpha1``): ports, identity, authz."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from authz.config import PathNormalization
from authz.proxy.model import DEFAULT_TRUST_DOMAIN, MeshView
from authz.request import EMPTY_MAP

__all__ = [
    "DEFAULT_MIRROR_CONCURRENCY",
    "DEFAULT_REPLAY_BUFFER_BYTES",
    "AuthorizerSettings",
    "ClientCertDetails",
    "ForwardClientCert",
    "IdentityFiles",
    "ListenerSettings",
    "ProxySettings",
    "SidecarConfig",
]

DEFAULT_REPLAY_BUFFER_BYTES = 64 * 1024
"""Request bodies up to this size are kept for retries and mirroring (Envoy
``per_request_buffer_limit_bytes``);
larger bodies stream through once, without retry or mirror (spec §3.2 "Streaming")."""
DEFAULT_MIRROR_CONCURRENCY = 64
"""Mirrored requests in flight at once; above it a mirror is skipped and counted, never queued."""


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    address: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    """PEM files of this workload's SVID (``write_svid`` layout): leaf cert, key, chain, trust bundle."""

    cert: str
    key: str
    bundle: str
    chain: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizerSettings:
    """``mode``: ``local`` (in-process engine), ``remote`` (gRPC ext_authz at ``address``) or ``none``.

    ``fail_open`` mirrors Envoy's ``failure_mode_allow`` (default false); ``status_on_error`` Envoy's
    ``status_on_error`` default 403.
    """

    mode: Literal["local", "remote", "none"] = "none"
    address: str = ""
    timeout: float = 0.2  # Envoy ext_authz grpc_service timeout default 200 ms
    fail_open: bool = False
    status_on_error: int = 403
    policy_paths: tuple[str, ...] = ()


ForwardClientCert = Literal[
    "SANITIZE", "FORWARD_ONLY", "APPEND_FORWARD", "SANITIZE_SET", "ALWAYS_FORWARD_ONLY"
]


@dataclass(frozen=True, slots=True)
class ClientCertDetails:
    """The inbound listener's ``x-forwarded-client-cert`` handling: Envoy HCM ``forward_client_cert_details``
    (``forward``) and ``set_current_client_cert_details`` (``subject``, ``cert``, ``uri``, ``dns``).

    Default ``SANITIZE_SET``: the header carries only what this sidecar verified, whatever the client sent
    (Istio's sidecars use APPEND_FORWARD, which keeps a client's elements in front of ours). The detail flags
    default to what istiod sets on sidecar inbound listeners: Subject, URI and DNS.
    """

    forward: ForwardClientCert = "SANITIZE_SET"
    subject: bool = True
    uri: bool = True
    dns: bool = True
    cert: bool = False
    """``Cert="<URL-encoded PEM>"``: the peer's leaf certificate (istiod does not set it on sidecars)."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Everything about this sidecar that is not an Istio resource."""

    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    service_account: str = "default"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = "istio-system"
    inbound: ListenerSettings | None = None
    app_address: str = "127.0.0.1"
    app_port: int = 0
    outbound: ListenerSettings | None = None
    admin: ListenerSettings | None = None
    identity: IdentityFiles | None = None
    authorizer: AuthorizerSettings = field(default_factory=AuthorizerSettings)
    replay_buffer_bytes: int = DEFAULT_REPLAY_BUFFER_BYTES
    mirror_concurrency: int = DEFAULT_MIRROR_CONCURRENCY
    access_log: bool = True
    client_cert: ClientCertDetails = field(default_factory=ClientCertDetails)
    path_normalization: PathNormalization = PathNormalization.BASE
    """meshConfig ``pathNormalization.normalization``; Istio's default is BASE (DEFAULT is its alias)."""

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """One loaded configuration generation: the sidecar settings plus the Istio resources it sees."""

    settings: ProxySettings
    mesh: MeshView

"""The bundled sidecar proxy: Istio traffic management (VirtualService, DestinationRule, ServiceEntry,
PeerAuthentication), mTLS on SPIFFE SVIDs, and authorization of every inbound request.

Layers (each a small ``handle``/``forward``): listener -> router -> cluster (LB, retry, mirror) -> pool ->
connection; pure pickers in :mod:`lb`, :mod:`retry`, :mod:`outlier`; the HTTP/1.1 codec in :mod:`http1`.
"""

from __future__ import annotations

from pathlib import Path

from authz.native import guard

# Before any of its modules is imported: the compiled build runs only if it matches the sources.
guard(__name__, Path(__file__).parent)

from authz.proxy.authz_client import AllowAll, Authorizer, GrpcAuthorizer  # noqa: E402 (after the guard)
from authz.proxy.loader import load_sidecar_config, parse_resources  # noqa: E402
from authz.proxy.settings import ProxySettings, SidecarConfig  # noqa: E402
from authz.proxy.sidecar import Sidecar  # noqa: E402

__all__ = [
    "AllowAll",
    "Authorizer",
    "GrpcAuthorizer",
    "ProxySettings",
    "Sidecar",
    "SidecarConfig",
    "load_sidecar_config",
    "parse_resources",
]

"""The bundled sidecar proxy: Istio traffic management (VirtualService, DestinationRule, ServiceEntry,
PeerAuthentication), mTLS on SPIFFE SVIDs, and authorization of every inbound request.

Layers (each a small ``handle``/``forward``): listener -> router -> cluster (LB, retry, mirror) -> pool ->
connection; pure pickers in :mod:`lb`, :mod:`retry`, :mod:`outlier`; the HTTP/1.1 codec in :mod:`http1`.
"""

from __future__ import annotations

from authz.proxy.authz_client import AllowAll, Authorizer, GrpcAuthorizer
from authz.proxy.loader import load_sidecar_config, parse_resources
from authz.proxy.settings import ProxySettings, SidecarConfig
from authz.proxy.sidecar import Sidecar

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

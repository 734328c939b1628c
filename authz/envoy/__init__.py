"""Envoy sidecar bootstraps that put meshauthz behind Envoy's ext_authz filter."""

from authz.envoy.bootstrap import SidecarSpec, TlsFiles, sidecar_bootstrap

__all__ = ["SidecarSpec", "TlsFiles", "sidecar_bootstrap"]

"""Mesh-wide settings, read from Istio's MeshConfig format (``--mesh FILE``), with Istio's defaults."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from authz.errors import ConfigError

__all__ = ["DEFAULT_MESH", "MeshConfig", "PathNormalization", "load_mesh_config", "parse_mesh_config"]

# Istio's defaults (istio pkg/config/mesh/mesh.go DefaultMeshConfig).
DEFAULT_ROOT_NAMESPACE = "istio-system"
DEFAULT_TRUST_DOMAIN = "cluster.local"


class PathNormalization(enum.Enum):
    """meshConfig ``pathNormalization.normalization`` (istio api mesh/v1alpha1 ProxyPathNormalization)."""

    NONE = "NONE"
    BASE = "BASE"  # DEFAULT is an alias of BASE
    MERGE_SLASHES = "MERGE_SLASHES"
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"


@dataclass(frozen=True, slots=True)
class MeshConfig:
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    trust_domain_aliases: tuple[str, ...] = ()
    path_normalization: PathNormalization = PathNormalization.BASE
    num_trusted_proxies: int = 0


DEFAULT_MESH = MeshConfig()


def parse_mesh_config(data: Any, file: str = "<mesh>") -> MeshConfig:
    """Build a :class:`MeshConfig` from a parsed MeshConfig document (unknown fields are ignored,
    as istiod ignores fields that do not concern it)."""
    if data is None:
        return DEFAULT_MESH
    if not isinstance(data, dict):
        raise ConfigError("MeshConfig must be a mapping", file=file)
    # Accept a bare MeshConfig or the `mesh` key of an istio ConfigMap's data.
    if "mesh" in data and isinstance(data["mesh"], str):
        data = yaml.safe_load(data["mesh"]) or {}
    root = data.get("rootNamespace", DEFAULT_ROOT_NAMESPACE)
    td = data.get("trustDomain", DEFAULT_TRUST_DOMAIN)
    aliases = data.get("trustDomainAliases") or []
    if not isinstance(root, str) or not root:
        raise ConfigError("must be a non-empty string", file=file, field="rootNamespace")
    if not isinstance(td, str) or not td:
        raise ConfigError("must be a non-empty string", file=file, field="trustDomain")
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError("must be a list of non-empty strings", file=file, field="trustDomainAliases")
    norm_raw = ((data.get("pathNormalization") or {}).get("normalization")) or "DEFAULT"
    if norm_raw == "DEFAULT":
        norm_raw = "BASE"
    try:
        norm = PathNormalization(norm_raw)
    except ValueError:
        raise ConfigError(
            f"unknown normalization {norm_raw!r} "
            "(NONE, BASE, DEFAULT, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)",
            file=file,
            field="pathNormalization.normalization",
        ) from None
    topo = ((data.get("defaultConfig") or {}).get("gatewayTopology")) or {}
    ntp = topo.get("numTrustedProxies", 0)
    if not isinstance(ntp, int) or isinstance(ntp, bool) or ntp < 0:
        raise ConfigError(
            "must be a non-negative integer",
            file=file,
            field="defaultConfig.gatewayTopology.numTrustedProxies",
        )
    return MeshConfig(
        root_namespace=root,
        trust_domain=td,
        trust_domain_aliases=tuple(aliases),
        path_normalization=norm,
        num_trusted_proxies=ntp,
    )


def load_mesh_config(path: Path | None) -> MeshConfig:
    if path is None:
        return DEFAULT_MESH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML syntax error: {exc}", file=str(path)) from None
    return parse_mesh_config(data, str(path))

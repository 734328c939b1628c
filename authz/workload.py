"""Which policies apply to which workload: Istio's namespace, root namespace and selector scoping."""

from __future__ import annotations

from collections.abc import Mapping

from authz.request import Workload

__all__ = ["parse_labels", "resolve_workload", "selects"]


def selects(
    policy_namespace: str,
    match_labels: Mapping[str, str] | None,
    workload: Workload,
    *,
    root_namespace: str,
) -> bool:
    """True if a policy in ``policy_namespace`` with ``selector.matchLabels`` applies to ``workload``.

    A policy in the root namespace applies mesh-wide; otherwise only in its own namespace. An absent
    or empty selector selects every workload in scope; otherwise every label must be present with an
    equal value (istio ``labels.Instance.SubsetOf``).
    """
    if policy_namespace not in (root_namespace, workload.namespace):
        return False
    if not match_labels:
        return True
    labels = workload.labels
    return all(labels.get(k) == v for k, v in match_labels.items())


def parse_labels(text: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` (the ``labels`` context extension). Items without ``=`` are ignored."""
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if sep and key:
            out[key] = value.strip()
    return out


def resolve_workload(
    context_extensions: Mapping[str, str],
    destination_principal: str,
    default: Workload,
) -> Workload:
    """The destination workload of a check, from the most specific source available:

    1. the ext_authz ``context_extensions`` set by the Envoy route (``namespace``, ``labels`` as
       ``k=v,k2=v2``); either key alone overrides only its part;
    2. the destination SPIFFE principal's ``/ns/<ns>/`` segment (the listener's own certificate);
    3. ``default`` (the ``serve`` flags of a single-workload sidecar deployment).
    """
    namespace = context_extensions.get("namespace", "")
    labels_text = context_extensions.get("labels")
    if not namespace and destination_principal:
        namespace = _namespace_of(destination_principal)
    if not namespace and labels_text is None:
        return default
    return Workload(
        namespace=namespace or default.namespace,
        labels=parse_labels(labels_text) if labels_text is not None else default.labels,
    )


def _namespace_of(spiffe_id: str) -> str:
    """``spiffe://td/ns/<ns>/sa/<sa>`` -> ``<ns>``; ``""`` when the ID has no ``ns`` segment."""
    parts = spiffe_id.split("/")
    for i in range(3, len(parts) - 1):
        if parts[i] == "ns" and parts[i + 1]:
            return parts[i + 1]
    return ""

"""Which policies apply to which workload: Istio's namespace, root namespace and selector scoping."""

from __future__ import annotations

from collections.abc import Mapping

from authz.request import Workload

__all__ = ["parse_labels", "selects"]


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

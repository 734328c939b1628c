"""Constants and small builders shared by the authn unit tests."""

from __future__ import annotations

from typing import Any

from authz.resources import Resource, parse_documents

ISSUER = "https://idp.test"
NOW = 1_700_000_000.0


def claims(**extra: object) -> dict[str, Any]:
    """A valid payload for :data:`ISSUER` at :data:`NOW`; pass ``name=None`` to drop a claim."""
    base: dict[str, Any] = {"iss": ISSUER, "sub": "alice", "exp": NOW + 600, "iat": NOW - 10}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def resources(text: str) -> list[Resource]:
    return parse_documents(text, "policies.yaml")

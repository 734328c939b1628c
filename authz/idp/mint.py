"""Helpers for tests and scripts: mint tokens straight from an IdP config and its keys, or run the IdP.

    idp = Idp.from_config()                      # the embedded default config, keys generated now
    token = idp.issuer().mint(sub="alice", aud="demo-api", claims={"groups": ["admins"]})

    with running_idp() as running:               # a real server on 127.0.0.1:<free port>
        jwks_url = running.endpoint("jwks")

Everything minted follows the issuer's clock (the injected clock plus its admin offset).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authz.clock import Clock, system_clock
from authz.idp.config import IdpConfig
from authz.idp.issuer import Issuer
from authz.idp.provider import Idp
from authz.idp.server import RunningIdp, running_idp

__all__ = ["Idp", "Issuer", "RunningIdp", "mint", "running_idp"]


def mint(
    config: IdpConfig | Idp | None = None,
    *,
    issuer: str = "",
    clock: Clock = system_clock,
    sub: str = "test-subject",
    aud: str | list[str] | None = None,
    claims: Mapping[str, Any] | None = None,
    **options: Any,
) -> str:
    """One-shot: a token from ``issuer`` of ``config`` (keys are generated, so verify with its JWKS)."""
    idp = config if isinstance(config, Idp) else Idp.from_config(config, clock=clock)
    return idp.issuer(issuer).mint(sub=sub, aud=aud, claims=claims, **options)

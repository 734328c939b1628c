"""The engine with its lifecycle, shared by ``authz serve`` and the bundled proxy's in-process mode.

Owns what the pure engine must not: loading the policy folder, the authenticator's background key
fetching, and hot reload (files and SIGHUP). ``check`` is the engine's, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from authz.authn import Authenticator
from authz.clock import Clock, system_clock
from authz.config import DEFAULT_MESH, MeshConfig
from authz.decision import Decision
from authz.decision_log import DecisionLog
from authz.engine import Engine
from authz.identity import PeerTrust
from authz.reload import PolicyReloader
from authz.request import Request, Workload
from authz.snapshot import Snapshot

__all__ = ["AuthzRuntime", "build_authorizer"]

# /readyz waits at most this long after start for every issuer's first key fetch (discovery + JWKS) to
# settle, one way or the other; an IdP that is down is then reported "failing", and we are ready anyway
# (tokens of that issuer are denied with a reason until it recovers).
ISSUER_SETTLE_GRACE = 10.0


class AuthzRuntime:
    """Load once (raises ``ConfigErrors`` on a broken folder), then ``start()`` / ``stop()``."""

    def __init__(
        self,
        policies: Sequence[Path],
        mesh: MeshConfig = DEFAULT_MESH,
        *,
        default_workload: Workload | None = None,
        peer_trust: PeerTrust | None = None,
        decision_log: DecisionLog | None = None,
        fail_open: bool = False,
        clock: Clock = system_clock,
    ) -> None:
        self.mesh = mesh
        self.reloader = PolicyReloader(list(policies), mesh, on_swap=self._swap, clock=clock)
        snapshot = self.reloader.load_initial()
        self.authenticator = Authenticator(settings=snapshot.authn_settings, clock=clock)
        self.engine = Engine(
            snapshot,
            mesh=mesh,
            authenticator=self.authenticator,
            default_workload=default_workload,
            peer_trust=peer_trust,
            clock=clock,
            decision_log=decision_log,
            fail_open=fail_open,
        )
        self.decision_log = decision_log
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._clock = clock
        self._started_at: float | None = None

    async def check(self, request: Request, workload: Workload | None = None) -> Decision:
        return await self.engine.check(request, workload)

    def check_now(self, request: Request, workload: Workload | None = None) -> Decision | None:
        """:meth:`Engine.check_now`: the decision when no token must be verified first, else None (then
        await :meth:`check`)."""
        return self.engine.check_now(request, workload)

    def _swap(self, snapshot: Snapshot) -> None:
        if snapshot.authn_settings != self.engine.snapshot.authn_settings:
            self.authenticator.update_settings(snapshot.authn_settings)
        self.authenticator.prepare(snapshot.all_jwt_rules())
        self.engine.swap(snapshot)

    async def start(self, *, watch: bool = True) -> None:
        self.authenticator.prepare(self.engine.snapshot.all_jwt_rules())
        await self.authenticator.start()
        self._started_at = self._clock()
        if watch:
            self._tasks.append(asyncio.create_task(self.reloader.watch(self._stop)))

    def issuers_settled(self) -> bool:
        """Every issuer's keys were fetched or marked failing (or the start-up grace is over)."""
        if self._started_at is None:
            return False
        if self._clock() - self._started_at > ISSUER_SETTLE_GRACE:
            return True
        sources = self.authenticator.describe().get("key_sources", [])
        if not isinstance(sources, list):
            return True
        return all(s.get("state") != "empty" for s in sources if isinstance(s, dict))

    def reload_soon(self) -> None:
        """Schedule a reload (the SIGHUP handler)."""
        self._tasks.append(asyncio.create_task(self.reloader.reload()))

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=3)
        await self.authenticator.close()
        if self.decision_log is not None:
            self.decision_log.close()

    def config_dump(self) -> dict[str, Any]:
        mesh = self.mesh
        return {
            "policies": self.engine.snapshot.describe(),
            "reload": self.reloader.describe(),
            "issuers": self.authenticator.describe(),
            "mesh": {
                "rootNamespace": mesh.root_namespace,
                "trustDomain": mesh.trust_domain,
                "trustDomainAliases": list(mesh.trust_domain_aliases),
                "pathNormalization": mesh.path_normalization.value,
                "numTrustedProxies": mesh.num_trusted_proxies,
            },
        }


def build_authorizer(policies: Sequence[Path], mesh: MeshConfig = DEFAULT_MESH) -> AuthzRuntime:
    """An in-process authorizer for the bundled proxy (``authorizer.mode: local``)."""
    return AuthzRuntime(policies, mesh)

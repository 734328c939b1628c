"""Hot reload: a new policy set is validated and compiled off to the side, then swapped atomically.

A set with errors is refused: logged, counted (``meshauthz_policy_reloads{result="error"}``), shown in
``/config_dump``, and the last good set stays in force. Triggered by file changes (``watchfiles``) and
by ``SIGHUP``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from authz.clock import Clock, system_clock
from authz.config import MeshConfig
from authz.errors import ConfigError, ConfigErrors
from authz.metrics import POLICY_GENERATION, POLICY_RELOADS
from authz.snapshot import Snapshot, load_snapshot

__all__ = ["PolicyReloader"]

log = logging.getLogger("authz.reload")

# File events arrive in bursts (editors write, rename, chmod): wait this long for quiet before reloading.
DEBOUNCE_MS = 200


class PolicyReloader:
    def __init__(
        self,
        paths: Sequence[Path],
        mesh: MeshConfig,
        *,
        on_swap: Any,
        clock: Clock = system_clock,
    ) -> None:
        self.paths = list(paths)
        self.mesh = mesh
        self._on_swap = on_swap
        self._clock = clock
        self.generation = 0
        self.last_error: list[dict[str, object]] = []
        self.last_error_at: float | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._lock = asyncio.Lock()
        self.snapshot: Snapshot | None = None  # the last good set

    def load_initial(self) -> Snapshot:
        """First load; raises :class:`ConfigErrors` (the server refuses to start on a broken folder)."""
        self.generation = 1
        snapshot = load_snapshot(self.paths, self.mesh, generation=1, loaded_at=self._clock())
        POLICY_GENERATION.set(1)
        self.snapshot = snapshot
        return snapshot

    def reload_now(self) -> bool:
        """Load, validate and compile; swap on success. Returns whether the new set is in force."""
        generation = self.generation + 1
        try:
            snapshot = load_snapshot(self.paths, self.mesh, generation=generation, loaded_at=self._clock())
        except ConfigErrors as exc:
            self._refused(exc.errors)
            return False
        except ConfigError as exc:
            self._refused([exc])
            return False
        emptied = _emptied_files(self.snapshot, snapshot) if self.snapshot is not None else []
        if emptied:
            self._refused(emptied)
            return False
        self.snapshot = snapshot
        self.generation = generation
        self._on_swap(snapshot)
        self.reloads_ok += 1
        self.last_error = []
        POLICY_RELOADS.labels(result="ok").inc()
        POLICY_GENERATION.set(generation)
        log.info("policy set generation %d in force (%d files)", generation, len(snapshot.sources))
        return True

    def _refused(self, errors: list[ConfigError]) -> None:
        self.reloads_failed += 1
        self.last_error = [e.as_dict() for e in errors]
        self.last_error_at = self._clock()
        POLICY_RELOADS.labels(result="error").inc()
        for e in errors:
            log.error("policy reload refused, last good set (generation %d) stays: %s", self.generation, e)

    async def reload(self) -> bool:
        async with self._lock:
            return await asyncio.to_thread(self.reload_now)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload on every settled change under the policy paths until ``stop`` is set."""
        import watchfiles

        watched = [p for p in self.paths if p.exists()]
        if not watched:
            return
        async for _changes in watchfiles.awatch(
            *watched, stop_event=stop, debounce=DEBOUNCE_MS, step=50, recursive=True
        ):
            await self.reload()

    def describe(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "reloads_ok": self.reloads_ok,
            "reloads_failed": self.reloads_failed,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


def _emptied_files(old: Snapshot, new: Snapshot) -> list[ConfigError]:
    """Files that held policies and still exist but now hold none. An editor or a tool that truncates
    before writing would otherwise make the watcher load "no policy here", which for a workload whose
    ALLOW policies lived there means allow-all. Deleting the file is how to remove its policies."""
    before = {r.file for r in old.resources}
    after = {r.file for r in new.resources}
    return [
        ConfigError(
            "the file held policies and now holds none (truncated while being written?); "
            "the last good set stays: delete the file to remove its policies",
            file=f,
            reason="policy_file_emptied",
        )
        for f in sorted(before - after)
        if Path(f).exists()
    ]

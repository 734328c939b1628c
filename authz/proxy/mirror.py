"""Traffic mirroring: fire-and-forget copies of a request to a shadow cluster (VS ``mirror``/``mirrors``).

The copy's Host gets ``-shadow`` appended before any port (Envoy ``RequestMirrorPolicy``, DPA l.838-845); the
primary never waits for it and its response is discarded after an optional comparison with the primary's
(status, selected headers, body SHA-256): mismatches are counted per route. Concurrency is bounded: when
``limit`` copies are in flight a new one is skipped, not queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from authz.proxy.message import ProxyResponse, ResponseBody

__all__ = ["HashingBody", "Mirrorer", "ResponseSummary", "shadow_authority"]

log = logging.getLogger("authz.proxy.mirror")
MIRROR_TIMEOUT = 30.0  # a mirror copy never lives longer than this
MAX_MIRROR_BODY = 16 * 1024 * 1024  # bytes read from a mirror response before giving up on the comparison


def shadow_authority(authority: str) -> str:
    """``cluster1:8080`` -> ``cluster1-shadow:8080``."""
    if authority.startswith("["):
        return authority
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return f"{host}-shadow:{port}"
    return f"{authority}-shadow"


@dataclass(frozen=True, slots=True)
class ResponseSummary:
    status: int
    headers: tuple[tuple[str, str], ...]
    body_sha256: str


def summarize(
    status: int, headers: list[tuple[str, str]], names: tuple[str, ...], digest: str
) -> ResponseSummary:
    picked = tuple((n, ",".join(v for k, v in headers if k == n)) for n in names)
    return ResponseSummary(status, picked, digest)


class HashingBody:
    """Wraps the primary's body: hashes what streams through, then resolves ``digest`` (no buffering)."""

    def __init__(self, inner: ResponseBody) -> None:
        self._inner = inner
        self._hash = hashlib.sha256()
        self.digest: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read(self) -> bytes | None:
        data = await self._inner.read()
        if data is None:
            if not self.digest.done():
                self.digest.set_result(self._hash.hexdigest())
        else:
            self._hash.update(data)
        return data

    def poll(self) -> bytes | None:
        data = self._inner.poll()
        if data is None:
            if not self.digest.done():
                self.digest.set_result(self._hash.hexdigest())
        elif data:
            self._hash.update(data)
        return data

    def take_all(self) -> bytes | None:
        return None  # streams through the hash chunk by chunk

    def abort(self) -> None:
        self._inner.abort()
        if not self.digest.done():
            self.digest.cancel()


class Mirrorer:
    def __init__(self, limit: int, on_result: Callable[[str, str], None] | None = None) -> None:
        self.limit = limit
        self.on_result = on_result or (lambda route, result: None)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(
        self,
        route: str,
        send: Callable[[], Awaitable[ProxyResponse]],
        compare: Callable[[ResponseSummary], Awaitable[None]] | None = None,
    ) -> bool:
        """Start a mirror copy; False (and counted as ``skipped``) when the limit is reached."""
        if len(self._tasks) >= self.limit:
            self.on_result(route, "skipped")
            return False
        task = asyncio.create_task(self._run(route, send, compare))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(
        self,
        route: str,
        send: Callable[[], Awaitable[ProxyResponse]],
        compare: Callable[[ResponseSummary], Awaitable[None]] | None,
    ) -> None:
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT):
                resp = await send()
                digest = hashlib.sha256()
                size = 0
                try:
                    while (chunk := await resp.body.read()) is not None:
                        size += len(chunk)
                        if size > MAX_MIRROR_BODY:
                            resp.body.abort()
                            break
                        digest.update(chunk)
                except Exception:
                    resp.body.abort()
                    raise
            self.on_result(route, "ok" if resp.status < 500 else "error")
            if compare is not None:
                await compare(ResponseSummary(resp.status, tuple(resp.headers), digest.hexdigest()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("mirror for %s failed: %s", route, exc)
            self.on_result(route, "failed")

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)

"""A listening server that stops gracefully: both fronts of ``authz serve`` use it.

Stopping stops accepting, asks every open connection to finish (HTTP/2: GOAWAY; HTTP/1.1: ``connection:
close`` on the answers still owed), waits for them to close themselves for up to a grace period, then
aborts whatever is left and waits (bounded) until every socket is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["GracefulServer", "StoppableConnection"]


class StoppableConnection(Protocol):
    def stop_gracefully(self) -> None:
        """Accept nothing new, answer what is owed, close once done (or at once when idle)."""

    def abort(self) -> None:
        """Close now, whatever is still open."""


C = TypeVar("C", bound=StoppableConnection)


class GracefulServer(Generic[C]):
    """The listening socket and its open connections (``asyncio.Server``'s ``sockets``, ``close`` and
    ``wait_closed``, plus :meth:`shutdown`). ``connections`` is the set the protocols add themselves to in
    ``connection_made`` and leave in ``connection_lost``."""

    def __init__(self, server: asyncio.Server, connections: set[C]) -> None:
        self._server = server
        self._connections = connections

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._server.sockets)

    def close(self) -> None:
        """Stop accepting connections (open ones stay; see :meth:`shutdown`)."""
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    async def shutdown(self, grace: float = 1.0) -> None:
        """Stop accepting, ask every connection to finish, wait up to ``grace`` seconds for them to close,
        then abort the rest."""
        self._server.close()
        for conn in list(self._connections):
            conn.stop_gracefully()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.01)  # bounded by the grace period
        for conn in list(self._connections):
            conn.abort()
        # Every transport reports connection_lost (which leaves the set) on a later loop iteration.
        closing_deadline = loop.time() + 1.0
        while self._connections and loop.time() < closing_deadline:
            await asyncio.sleep(0.005)  # bounded: one second at most
        await self._server.wait_closed()

"""A connection as the proxy sees it: an :class:`asyncio.Protocol` that feeds every received byte straight
into a strict HTTP/1.1 parser, and a coroutine side that pulls parsed events and writes bytes.

This is the design choice that makes a Python data path cheap (spec ``proxy.md`` §3.3: Protocol callbacks,
not streams, not a task per request): no ``StreamReader`` buffer copies, no future per read when the
events are already parsed, no timer per read (deadlines are swept by the listener, see
:meth:`Channel.expire`).

Back-pressure (spec §3.2) both ways: reading pauses while parsed events pile up unconsumed
(:data:`MAX_QUEUED_EVENTS`), and writers wait in :meth:`Channel.drain` while the transport's buffer is
above its high-water mark (``pause_writing``/``resume_writing``).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol, cast

from authz.proxy.http1 import Event

__all__ = ["MAX_QUEUED_EVENTS", "WRITE_HIGH_WATER", "Channel", "EventSource"]

WRITE_HIGH_WATER = 256 * 1024  # transport buffer above which drain() waits (asyncio's default is 64 KiB)
MAX_QUEUED_EVENTS = 8  # parsed but unconsumed events (up to 256 KiB of body each) before reading pauses


class EventSource(Protocol):
    """What a channel feeds: :class:`authz.proxy.http1.RequestParser` or ``ResponseParser``."""

    @property
    def events(self) -> collections.deque[Event]: ...

    @property
    def failed(self) -> bool: ...

    def feed(self, data: bytes) -> None: ...


class Channel(asyncio.Protocol):
    """One connection: bytes in -> ``parser`` -> :meth:`next_event`; :meth:`write` / :meth:`drain` out."""

    __slots__ = (
        "_drain_waiter",
        "_loop",
        "_read_paused",
        "_waiter",
        "_write_paused",
        "deadline",
        "eof",
        "lost",
        "parser",
        "transport",
    )

    def __init__(self, parser: EventSource) -> None:
        self.parser = parser
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.deadline = 0.0  # loop time after which a pending next_event() fails with TimeoutError (0: none)
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # An asyncio.Transport; uvloop's transports have the same methods but another class.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        events = parser.events
        if events or parser.failed:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if len(events) >= MAX_QUEUED_EVENTS and not self._read_paused and self.transport is not None:
                self._read_paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close our side too: a half-closed HTTP/1.1 peer is done with us

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = True
        self._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the coroutine side --------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def expire(self, now: float) -> None:
        """Fail a pending wait whose deadline has passed (called by the listener's sweeper)."""
        waiter = self._waiter
        if waiter is not None and self.deadline and now >= self.deadline and not waiter.done():
            waiter.set_exception(TimeoutError())

    def wait(self) -> asyncio.Future[None]:
        """A future done when something arrives (event, EOF, parser failure); TimeoutError once
        :attr:`deadline` passes. Awaited directly by the hot paths: a future, not one more coroutine
        frame to suspend and resume through."""
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        waiter = self._loop.create_future()
        self._waiter = waiter
        return waiter

    def pop(self) -> Event:
        """The first queued event (the caller checked there is one); resumes reading once drained."""
        events = self.parser.events
        ev = events.popleft()
        if self._read_paused and len(events) < 2 and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return ev

    async def next_event(self) -> Event | None:
        """The next parsed event; None once the peer closed (or the parser failed with nothing queued).

        Raises TimeoutError when :attr:`deadline` passes while waiting.
        """
        parser = self.parser
        events = parser.events
        while not events:
            if parser.failed or self.eof:
                return None
            await self.wait()
        return self.pop()

    def write(self, data: bytes) -> None:
        """Queue ``data``; raises ConnectionResetError once the connection is gone (what ``drain`` raises
        in asyncio streams), so a writer never pours bytes into a dead transport."""
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection lost")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is above its high-water mark."""
        if self.lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiter = waiter
        try:
            await waiter
        finally:
            self._drain_waiter = None

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is above its high-water mark: :meth:`drain` would wait."""
        return self._write_paused

    @property
    def closed(self) -> bool:
        return self.eof or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

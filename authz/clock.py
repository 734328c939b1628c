"""The clock, injected. Pure cores take ``now`` as an argument; edges take a :data:`Clock`."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Clock", "FrozenClock", "monotonic_clock", "system_clock"]

Clock = Callable[[], float]
"""Returns seconds since the epoch (wall clock) as a float."""

system_clock: Clock = time.time
monotonic_clock: Clock = time.monotonic


class FrozenClock:
    """A clock for tests: returns ``now`` until told otherwise."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
